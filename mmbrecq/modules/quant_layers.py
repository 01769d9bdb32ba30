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

from mmbrecq.quantizers import UniformQuantizer


class QuantLayerMixin:
    """Input (activation) quantizer + weight quantizer around a float layer's forward."""

    weight_quantizer: nn.Module
    input_quantizer: nn.Module  # may be None when the input is quantized upstream

    def _attach_quantizers(self, weight_quantizer, input_quantizer):
        for q, role in ((weight_quantizer, 'weight'), (input_quantizer, 'act')):
            if isinstance(q, UniformQuantizer):  # any module may stand in (tests, analysis tools)
                q.set_role(role)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    @classmethod
    def _wrap(cls, layer, weight_quantizer, input_quantizer, *args, **kwargs):
        """The twin of ``layer`` (built with ``args``/``kwargs``, no init) sharing its weight and bias."""
        q = torch.nn.utils.skip_init(cls, *args, bias=layer.bias is not None, device=layer.weight.device,
                                     dtype=layer.weight.dtype, **kwargs)
        q.weight, q.bias = layer.weight, layer.bias
        q._attach_quantizers(weight_quantizer, input_quantizer)
        return q

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight are fake-quantized."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer, input_quantizer):
        return cls._wrap(conv, weight_quantizer, input_quantizer, conv.in_channels, conv.out_channels,
                         conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                         groups=conv.groups, padding_mode=conv.padding_mode)

    def forward(self, x):
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose input and weight are fake-quantized."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer, input_quantizer):
        return cls._wrap(linear, weight_quantizer, input_quantizer, linear.in_features, linear.out_features)

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
