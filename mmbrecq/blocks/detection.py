"""Rules for mmdet's own ResNet blocks (detector backbones)."""
from mmbrecq.registry import BLOCK_RULES
from .base import ResidualBlockRule


@BLOCK_RULES.register_module()
class MMDetBasicBlockRule(ResidualBlockRule):
    block_types = ('mmdet.models.backbones.resnet.BasicBlock', )
    kind = 'BasicBlock'


@BLOCK_RULES.register_module()
class MMDetBottleneckRule(ResidualBlockRule):
    block_types = ('mmdet.models.backbones.resnet.Bottleneck', )
    kind = 'Bottleneck'
