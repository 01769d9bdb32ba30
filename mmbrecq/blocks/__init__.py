from .base import BlockRule, ResidualBlockRule, quant_layer_names
from .classification import InvertedResidualRule, MMPretrainBasicBlockRule, MMPretrainBottleneckRule
from .detection import MMDetBasicBlockRule, MMDetBottleneckRule

__all__ = [
    'BlockRule', 'ResidualBlockRule', 'quant_layer_names', 'MMPretrainBasicBlockRule',
    'MMPretrainBottleneckRule', 'InvertedResidualRule', 'MMDetBasicBlockRule', 'MMDetBottleneckRule'
]
