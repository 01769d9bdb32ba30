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


class _SampledStepGrad(torch.autograd.Function):
    """``out`` unchanged; backward gives the sampled input rows ``xq_rows`` the gradient they
    would get in the layer, from the sampled part of ``out``'s gradient times ``stride``
    (:meth:`QuantLayerMixin._rows_input_grad`: no forward pass of the sample is needed)."""

    @staticmethod
    def forward(ctx, out, xq_rows, weight, layer, op, stride):
        ctx.layer, ctx.op, ctx.stride = layer, op, stride
        ctx.save_for_backward(xq_rows.detach(), weight)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_rows = ctx.layer._sample_rows(grad, ctx.stride) * ctx.stride
        return grad, ctx.layer._rows_input_grad(grad_rows, rows, weight, ctx.op), None, None, None, None


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
        self.input_step_grad_stride = 1

    def sample_input_step_grad(self, stride: int):
        """Estimate the input quantizer's step gradient from every ``stride``-th sample.

        Why: when the layer's input needs no gradient (a unit's cached input) but its
        quantizer's step is learned, that step's gradient is the only consumer of the
        layer's data gradient ``dY . W``, a full extra matmul (or transposed convolution)
        per reconstruction step that a float forward+backward does not run. Computed on
        every ``stride``-th input row (:meth:`_sample_rows`: a Linear's tokens over the whole
        batch, a convolution's samples) and scaled by ``stride``, it is an unbiased
        estimate (the batch is a random draw) at ``1/stride`` of the cost; the layer's
        output and its weight gradient are exact. Used only while it applies (the input
        needs no gradient, the quantizer says its step gradient may be sampled); otherwise,
        and with ``stride=1``, the layer runs as usual.
        """
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f'{type(self).__name__}: the step-gradient stride must be a positive integer, '
                             f'got {stride!r}')
        self.input_step_grad_stride = stride

    def _samples_step_grad(self, x: torch.Tensor) -> bool:
        stride = getattr(self, 'input_step_grad_stride', 1)
        return (stride > 1 and torch.is_grad_enabled() and not x.requires_grad and x.dim() > 1
                and self._num_rows(x) > stride and getattr(self.input_quantizer, 'step_grad_samplable', False))

    def _quantized_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        """``op(quantized input, quantized weight, bias)``, with the step gradient sampled
        (:meth:`sample_input_step_grad`) when it applies."""
        if not self._samples_step_grad(x):
            return op(self._quantize_input(x), self.quantized_weight(), self.bias)
        stride = self.input_step_grad_stride
        with torch.no_grad():
            xq = self.input_quantizer(x)
        w = self.quantized_weight()
        out = op(xq, w, self.bias)
        rows = self.input_quantizer.quantize_sample(self._sample_rows(x, stride), x)
        return _SampledStepGrad.apply(out, rows, w.detach(), self, op, stride)

    @staticmethod
    def _num_rows(t: torch.Tensor) -> int:
        return t.shape[0]

    @staticmethod
    def _sample_rows(t: torch.Tensor, stride: int) -> torch.Tensor:
        """Every ``stride``-th sample (dim 0): the rows that the layer maps independently."""
        return t[::stride]

    @staticmethod
    def _rows_input_grad(grad_rows, rows, weight, op):
        """The gradient of ``op(rows, weight)`` w.r.t. ``rows`` for ``grad_rows`` (by autograd;
        a Linear has the direct matmul)."""
        with torch.enable_grad():
            rows = rows.detach().requires_grad_(True)
            return torch.autograd.grad(op(rows, weight, None), rows, grad_rows)[0]

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
        return self._quantized_forward(x, self._conv_forward)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose input and weight are fake-quantized."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer, input_quantizer):
        return cls._wrap(linear, weight_quantizer, input_quantizer, linear.in_features, linear.out_features)

    def forward(self, x):
        return self._quantized_forward(x, F.linear)

    @staticmethod
    def _num_rows(t: torch.Tensor) -> int:
        return t.numel() // max(t.shape[-1], 1)

    @staticmethod
    def _sample_rows(t: torch.Tensor, stride: int) -> torch.Tensor:
        """Every ``stride``-th token over the whole batch: a spread-out sample (the tokens of
        one image are correlated), mapped independently by the Linear."""
        return t.reshape(-1, t.shape[-1])[::stride]

    @staticmethod
    def _rows_input_grad(grad_rows, rows, weight, op):
        return grad_rows @ weight


#: float class -> quantized twin; subclasses (mmcv's Conv2d/Linear wrappers) match too
QUANT_LAYER_TYPES = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quant_twin(module: nn.Module):
    """The quantized class for a float layer, or ``None`` if it is not quantizable.

    The most specific registered class wins (a ``Conv2d`` subclass with its own forward,
    e.g. mmcv's ``Conv2dAdaptivePadding``, has its own twin)."""
    if isinstance(module, QuantLayerMixin):
        return None
    return next((QUANT_LAYER_TYPES[t] for t in type(module).__mro__ if t in QUANT_LAYER_TYPES), None)
