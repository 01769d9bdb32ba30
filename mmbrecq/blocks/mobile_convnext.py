"""Rules for mmpretrain's modern CNN blocks: ConvNeXt, MobileNetV3 / EfficientNet (MBConv), EdgeResidual.

Every rule keeps the base placement (:class:`BlockRule`), which is right for all of them:

* **ConvNeXtBlock** ``x + gamma * pw2(GELU(pw1(LN(dw7x7(x)))))``: the depthwise conv and
  the residual read the block input (one shared pre-hook quantizer); ``pointwise_conv1``
  reads the LayerNorm output and ``pointwise_conv2`` the GELU output, each through its
  own input quantizer. LayerNorm, GELU, the layer scale ``gamma`` (and ConvNeXt-V2's GRN)
  stay float: LayerNorm cannot be folded into the depthwise conv before it (it normalises
  over channels, per position), so the Linear after it sees the normalised values
  quantized, as in the ViT PTQ literature. Drop path is identity in eval mode.
* **InvertedResidual** (``mmpretrain.models.utils``, MobileNetV3 and EfficientNet)
  ``[x +] linear(SE(dw(expand(x))))``: the first conv (``expand_conv``, or the depthwise
  conv when there is no expansion) and the residual read the block input; every other
  conv has its own input quantizer. BatchNorm is folded into every ``ConvModule`` conv
  (depthwise ones included: one folded scale per channel, and the per-channel weight
  ranges are then one per input channel of the depthwise conv).
* **EdgeResidual** (EfficientNet-EdgeTPU) ``[x +] conv2(SE(conv1(x)))``: the same.

The SE branch (``SELayer``: pool → conv1 → act → conv2 → hard-sigmoid/sigmoid → ``x *
gate``) belongs to the block unit, so its two convs are reconstructed with the block
against the block's output. Its quantizers:

* ``se.conv1`` reads the globally pooled tensor: a new tensor (the mean of the depthwise
  output, off the grid of anything upstream), which an integer kernel needs quantized, so
  it has its own input quantizer (it quantizes one value per channel and image);
* ``se.conv2`` reads the ReLU output: its own quantizer, as after every activation;
* the product ``x * gate`` is the input of ``linear_conv`` / ``conv2``, quantized by that
  conv's input quantizer: the multiply is an activation like any other. The two factors
  stay float, as the residual add's operands do in every block.

Hard-swish outputs are signed (down to -3/8): the activation quantizers are asymmetric
with a range that contains the observed minimum, so the negative values keep codes.
"""
from mmbrecq.registry import BLOCK_RULES

from .base import BlockRule


class _SEBlockRule(BlockRule):
    """A block with an optional SE branch (``with_se``): one rule (and unit kind) each way,
    so that ``summary.json`` counts them apart."""

    with_se = False

    def match(self, parent, name, module):
        return self.matches(module) and bool(getattr(module, 'with_se', False)) == self.with_se


@BLOCK_RULES.register_module()
class ConvNeXtBlockRule(BlockRule):
    """mmpretrain ``ConvNeXtBlock`` (ConvNeXt V1 and V2): dw 7x7 conv → LN → Linear → GELU → Linear."""
    block_types = ('mmpretrain.models.backbones.convnext.ConvNeXtBlock', )
    kind = 'ConvNeXtBlock'


@BLOCK_RULES.register_module()
class MBInvertedResidualRule(_SEBlockRule):
    """``mmpretrain.models.utils.InvertedResidual`` without SE (MobileNetV3, EfficientNet)."""
    block_types = ('mmpretrain.models.utils.inverted_residual.InvertedResidual', )
    kind = 'InvertedResidual'


@BLOCK_RULES.register_module()
class MBInvertedResidualSERule(MBInvertedResidualRule):
    """``mmpretrain.models.utils.InvertedResidual`` with its ``SELayer``."""
    with_se = True
    kind = 'InvertedResidualSE'


@BLOCK_RULES.register_module()
class EdgeResidualRule(_SEBlockRule):
    """EfficientNet(-EdgeTPU) ``EdgeResidual`` without SE: full conv → 1x1 projection."""
    block_types = ('mmpretrain.models.backbones.efficientnet.EdgeResidual', )
    kind = 'EdgeResidual'


@BLOCK_RULES.register_module()
class EdgeResidualSERule(EdgeResidualRule):
    """EfficientNet(-EdgeTPU) ``EdgeResidual`` with its ``SELayer``."""
    with_se = True
    kind = 'EdgeResidualSE'
