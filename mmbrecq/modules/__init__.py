from .bn_fold import fold_bn, fold_conv_bn
from .quant_config import QuantConfig
from .quant_layers import QuantConv2d, QuantLayerMixin, QuantLinear, quant_twin
from .quant_layers_mmcv import QuantConv2dAdaptivePadding
from .swap import (Unit, calibrate_activations, find_units, quantize_model, quantizers_of,
                   set_quant_state, unit_layers)

__all__ = [
    'fold_bn', 'fold_conv_bn', 'QuantConfig', 'QuantConv2d', 'QuantConv2dAdaptivePadding', 'QuantLinear',
    'QuantLayerMixin',
    'quant_twin', 'quantize_model', 'find_units', 'Unit', 'set_quant_state', 'quantizers_of',
    'calibrate_activations', 'unit_layers'
]
