from .base import BlockRule, ResidualBlockRule, ResNetStemRule
from .classification import (InvertedResidualRule, MMPretrainBasicBlockRule, MMPretrainBottleneckRule,
                             MMPretrainResNetStemRule)
from .detection import MMDetBasicBlockRule, MMDetBottleneckRule, MMDetResNetStemRule
from .transformer import (SwinBlockRule, TransformerAttentionHalfRule, TransformerEncoderLayerRule,
                          TransformerMLPHalfRule)

__all__ = [
    'BlockRule', 'ResidualBlockRule', 'ResNetStemRule', 'MMPretrainBasicBlockRule', 'MMPretrainBottleneckRule',
    'MMPretrainResNetStemRule', 'InvertedResidualRule', 'MMDetBasicBlockRule', 'MMDetBottleneckRule',
    'MMDetResNetStemRule', 'TransformerEncoderLayerRule', 'SwinBlockRule', 'TransformerAttentionHalfRule',
    'TransformerMLPHalfRule'
]
