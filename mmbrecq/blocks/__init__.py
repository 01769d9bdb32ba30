from .base import BlockRule, ResidualBlockRule
from .classification import InvertedResidualRule, MMPretrainBasicBlockRule, MMPretrainBottleneckRule
from .detection import MMDetBasicBlockRule, MMDetBottleneckRule

__all__ = [
    'BlockRule', 'ResidualBlockRule', 'MMPretrainBasicBlockRule',
    'MMPretrainBottleneckRule', 'InvertedResidualRule', 'MMDetBasicBlockRule', 'MMDetBottleneckRule'
]
