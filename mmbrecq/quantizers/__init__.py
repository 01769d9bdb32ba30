from .adaround import AdaRoundQuantizer
from .functional import fake_quant, qparams_from_range, round_ste
from .log2 import Log2Quantizer
from .lsq import LSQQuantizer
from .range_search import lp_search_range, minmax_range
from .reparam import ChannelReparamQuantizer
from .twin_uniform import TwinUniformQuantizer
from .uniform import VALID_BITS, UniformQuantizer, check_bits, grid_bounds

__all__ = [
    'UniformQuantizer', 'LSQQuantizer', 'AdaRoundQuantizer', 'Log2Quantizer', 'ChannelReparamQuantizer',
    'TwinUniformQuantizer',
    'fake_quant', 'round_ste', 'qparams_from_range', 'lp_search_range', 'minmax_range', 'VALID_BITS', 'check_bits',
    'grid_bounds'
]
