from .adaround import AdaRoundQuantizer
from .functional import fake_quant, grad_scale, qparams_from_range, round_ste
from .log2 import Log2Quantizer
from .lsq import LSQQuantizer
from .range_search import lp_search_range, minmax_range
from .reparam import ChannelReparamQuantizer
from .uniform import VALID_BITS, UniformQuantizer, check_bits

__all__ = [
    'UniformQuantizer', 'LSQQuantizer', 'AdaRoundQuantizer', 'Log2Quantizer', 'ChannelReparamQuantizer',
    'fake_quant', 'grad_scale', 'round_ste', 'qparams_from_range', 'lp_search_range', 'minmax_range', 'VALID_BITS',
    'check_bits'
]
