from .base import BlockRule, ResidualBlockRule, ResNetStemRule
from .classification import (
                             InvertedResidualRule,
                             MMPretrainBasicBlockRule,
                             MMPretrainBottleneckRule,
                             MMPretrainResNetStemRule,
)
from .detection import MMDetBasicBlockRule, MMDetBottleneckRule, MMDetResNetStemRule
from .mobile_convnext import (
                             ConvNeXtBlockRule,
                             EdgeResidualRule,
                             EdgeResidualSERule,
                             MBInvertedResidualRule,
                             MBInvertedResidualSERule,
)
from .transformer import (
                             SwinBlockRule,
                             TransformerAttentionHalfRule,
                             TransformerEncoderLayerRule,
                             TransformerMLPHalfRule,
)

__all__ = [
    'BlockRule', 'ResidualBlockRule', 'ResNetStemRule', 'MMPretrainBasicBlockRule', 'MMPretrainBottleneckRule',
    'MMPretrainResNetStemRule', 'InvertedResidualRule', 'MMDetBasicBlockRule', 'MMDetBottleneckRule',
    'MMDetResNetStemRule', 'ConvNeXtBlockRule', 'MBInvertedResidualRule', 'MBInvertedResidualSERule',
    'EdgeResidualRule', 'EdgeResidualSERule', 'TransformerEncoderLayerRule', 'SwinBlockRule',
    'TransformerAttentionHalfRule', 'TransformerMLPHalfRule'
]
