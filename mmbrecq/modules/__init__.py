from .bn_fold import fold_bn, fold_conv_bn
from .coverage import uncovered_blocks, warn_uncovered_blocks
from .marks import TAIL_ATTR, UNIT_ATTR
from .quant_config import QuantConfig
from .quant_layers import QuantConv2d, QuantLayerMixin, QuantLinear, quant_twin
from .quant_layers_mmcv import QuantConv2dAdaptivePadding
from .quant_state import quantizers_of, set_quant_state
from .swap import quantizable_layers, quantize_model

__all__ = [
    'fold_bn', 'fold_conv_bn', 'QuantConfig', 'QuantConv2d', 'QuantConv2dAdaptivePadding', 'QuantLinear',
    'QuantLayerMixin',
    'quant_twin', 'quantizable_layers', 'quantize_model', 'set_quant_state', 'quantizers_of', 'UNIT_ATTR', 'TAIL_ATTR',
    'uncovered_blocks', 'warn_uncovered_blocks'
]
