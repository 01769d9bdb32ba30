"""Quantized twins of the float layers: still the float layer, with two quantizers beside it.

``QuantConv2d`` *is* an ``nn.Conv2d`` (grouped and depthwise convolutions, with or
without bias, any padding mode) and ``QuantLinear`` *is* an ``nn.Linear``: code that
inspects the model (mmdet init, ``isinstance`` checks, FLOP counters) keeps working, the
float weight stays in ``.weight`` for reconstruction, and ``forward`` only inserts the
fake quantization of the input and of the weight.
"""
import torch
from torch import nn
from torch.nn import functional as F


class QuantLayerMixin:
    """Input (activation) quantizer + weight quantizer around a float layer's forward."""

    weight_quantizer: nn.Module
    input_quantizer: nn.Module  # may be None when the input is quantized upstream

    def _attach_quantizers(self, weight_quantizer, input_quantizer):
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def set_quant_state(self, weight: bool = True, act: bool = True):
        """Switch weight and activation quantization on or off (float reference = both off)."""
        self.weight_quantizer.enabled = weight
        if self.input_quantizer is not None:
            self.input_quantizer.enabled = act

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight are fake-quantized."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer, input_quantizer):
        q = torch.nn.utils.skip_init(
            cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype)
        q.weight = conv.weight
        q.bias = conv.bias
        q._attach_quantizers(weight_quantizer, input_quantizer)
        return q

    def forward(self, x):
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose input and weight are fake-quantized."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer, input_quantizer):
        q = torch.nn.utils.skip_init(
            cls, linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        q._attach_quantizers(weight_quantizer, input_quantizer)
        return q

    def forward(self, x):
        return F.linear(self._quantize_input(x), self.quantized_weight(), self.bias)


#: float class -> quantized twin; subclasses (mmcv's Conv2d/Linear wrappers) match too
QUANT_LAYER_TYPES = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quant_twin(module: nn.Module):
    """The quantized class for a float layer, or ``None`` if it is not quantizable.

    The most specific registered class wins (a ``Conv2d`` subclass with its own forward,
    e.g. mmcv's ``Conv2dAdaptivePadding``, has its own twin)."""
    if isinstance(module, QuantLayerMixin):
        return None
    return next((QUANT_LAYER_TYPES[t] for t in type(module).__mro__ if t in QUANT_LAYER_TYPES), None)
