from .bn_fold import fold_bn, fold_conv_bn
from .quant_config import QuantConfig
from .quant_layers import QuantConv2d, QuantLayerMixin, QuantLinear, quant_twin
from .quant_state import quantizers_of, set_quant_state
from .swap import TAIL_ATTR, UNIT_ATTR, quantizable_layers, quantize_model

__all__ = [
    'fold_bn', 'fold_conv_bn', 'QuantConfig', 'QuantConv2d', 'QuantLinear', 'QuantLayerMixin',
    'quant_twin', 'quantizable_layers', 'quantize_model', 'set_quant_state', 'quantizers_of', 'UNIT_ATTR', 'TAIL_ATTR'
]
