"""Rules for detectors: mmdet's ResNet blocks (backbones) and the conv towers of dense heads.

FPN lateral/output convs, the RPN's convs and the RoI box head's FCs need no rule: each is
a single layer and becomes a layer-wise unit (called once per pyramid level where the
head is shared). The towers of dense heads (RetinaNet, FCOS, ATSS, ...) are stacks of
ConvModules that the head runs in a Python loop (``for conv in self.cls_convs: x =
conv(x)``), so no module call covers a tower; :class:`HeadTower` provides one without
changing the model's parameter names.
"""
from torch import nn

from mmbrecq.registry import BLOCK_RULES

from .base import BlockRule, ResidualBlockRule, ResNetStemRule, _resolve


@BLOCK_RULES.register_module()
class MMDetBasicBlockRule(ResidualBlockRule):
    block_types = ('mmdet.models.backbones.resnet.BasicBlock', )
    kind = 'BasicBlock'


@BLOCK_RULES.register_module()
class MMDetBottleneckRule(ResidualBlockRule):
    block_types = ('mmdet.models.backbones.resnet.Bottleneck', )
    kind = 'Bottleneck'


@BLOCK_RULES.register_module()
class MMDetResNetStemRule(ResNetStemRule):
    backbone_types = ('mmdet.models.backbones.resnet.ResNet', )


class HeadTower(nn.ModuleList):
    """A head's ``ModuleList`` of convs that runs as one module: one reconstruction unit.

    The head's own loop ``for conv in tower: x = conv(x)`` iterates once, over the tower
    itself, whose ``forward`` applies the convs in order; the convs stay registered under
    ``0``, ``1``, ... so parameter names (checkpoints, baked exports) do not change, and
    indexing/``len`` still see the convs (not the input quantizer added later).
    """

    def __init__(self, layers):
        super().__init__(layers)
        self._num_layers = len(layers)

    def __len__(self):  # ModuleList.__init__ appends through len() before _num_layers exists
        return self.__dict__.get('_num_layers', len(self._modules))

    def __iter__(self):
        return iter((self, ))

    def layers(self):
        return [self._modules[str(i)] for i in range(self._num_layers)]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


@BLOCK_RULES.register_module()
class DenseHeadTowerRule(BlockRule):
    """``cls_convs`` / ``reg_convs`` of mmdet dense heads: each tower is one unit (BRECQ's
    "head tower" block); its first conv reads the tower input, quantized once."""

    head_types = ('mmdet.models.dense_heads.base_dense_head.BaseDenseHead', )
    tower_names = ('cls_convs', 'reg_convs')
    kind = 'HeadTower'

    def match(self, parent, name, module):
        heads = tuple(t for t in (_resolve(p) for p in self.head_types) if t is not None)
        return (bool(heads) and isinstance(parent, heads) and name in self.tower_names
                and type(module) in (nn.ModuleList, HeadTower) and len(module) > 0)

    def prepare(self, parent, name, module):
        return module if isinstance(module, HeadTower) else HeadTower(list(module))
