"""Quantized twins of mmcv's convolution variants that compute their own padding.

mmcv's ``Conv2dAdaptivePadding`` (EfficientNet's ``conv_cfg``) is an ``nn.Conv2d`` built
with ``padding=0`` whose ``forward`` pads the input TensorFlow-"same" style, by an amount
that depends on the input size. The plain ``QuantConv2d`` twin would drop that padding
(every EfficientNet feature map would shrink), so it has a twin of its own, registered in
``QUANT_LAYER_TYPES`` (``quant_twin`` picks the most specific class).
"""
import math

from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
from torch import nn
from torch.nn import functional as F

from .quant_layers import QUANT_LAYER_TYPES, QuantConv2d


def same_padding(x, kernel_size, stride, dilation):
    """``[left, right, top, bottom]``: the padding ``Conv2dAdaptivePadding.forward`` applies."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
    pad_h, pad_w = pads
    return [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]


class QuantConv2dAdaptivePadding(QuantConv2d, Conv2dAdaptivePadding):
    """``QuantConv2d`` that pads its (quantized) input as ``Conv2dAdaptivePadding`` does.

    It is a ``Conv2dAdaptivePadding`` too (``isinstance`` checks keep working). The input
    is quantized before the zero padding: zero is exactly representable on every grid
    (``qparams_from_range`` widens ranges to contain it), so the order does not change the
    values, and it is the order of an integer kernel (pad with the zero point).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode='zeros', device=None, dtype=None):
        # nn.Conv2d's signature (device=, padding_mode=: what QuantConv2d.from_float passes);
        # the mmcv constructor only forces padding=0, which from_float copies anyway
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device, dtype)

    def forward(self, x):
        return self._quantized_forward(x, self._padded_conv)

    def _padded_conv(self, x, weight, bias):
        pad = same_padding(x, self.weight.shape[-2:], self.stride, self.dilation)
        if any(pad):
            x = F.pad(x, pad)
        return self._conv_forward(x, weight, bias)


QUANT_LAYER_TYPES[Conv2dAdaptivePadding] = QuantConv2dAdaptivePadding
