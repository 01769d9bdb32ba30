"""Rules for the mmpretrain backbones the paper evaluates (ResNet family, RegNet, MobileNetV2)."""
from mmbrecq.registry import BLOCK_RULES

from .base import BlockRule, ResidualBlockRule, ResNetStemRule


@BLOCK_RULES.register_module()
class MMPretrainBasicBlockRule(ResidualBlockRule):
    """mmpretrain ``BasicBlock`` (ResNet-18/34 and the V1c/V1d variants)."""
    block_types = ('mmpretrain.models.backbones.resnet.BasicBlock', )
    kind = 'BasicBlock'


@BLOCK_RULES.register_module()
class MMPretrainBottleneckRule(ResidualBlockRule):
    """mmpretrain ``Bottleneck`` and its subclasses (ResNet-50+, ResNeXt, RegNet)."""
    block_types = ('mmpretrain.models.backbones.resnet.Bottleneck', )
    kind = 'Bottleneck'


@BLOCK_RULES.register_module()
class MMPretrainResNetStemRule(ResNetStemRule):
    """Stem of mmpretrain ``ResNet`` and its subclasses (ResNet-18…152, ResNeXt, …)."""
    backbone_types = ('mmpretrain.models.backbones.resnet.ResNet', )


@BLOCK_RULES.register_module()
class InvertedResidualRule(BlockRule):
    """MobileNetV2 ``InvertedResidual``: expand → depthwise → linear projection (+ input)."""
    block_types = ('mmpretrain.models.backbones.mobilenet_v2.InvertedResidual', )
    kind = 'InvertedResidual'
