"""The reconstruction objective: output error (optionally Fisher-weighted) + rounding term."""
import torch

from mmbrecq.config import FISHER_WEIGHTS
from mmbrecq.ops import dispatch


def fisher_weight(grad: torch.Tensor, mode: str, mean_sq: float = None) -> torch.Tensor:
    """Per-element weight of the squared output error from the task-loss gradient ``grad``.

    * ``'raw'``: ``g²``, the paper's diagonal Fisher term. Its scale is tiny, so at λ=0.01
      the rounding regulariser dominates and rounding collapses to nearest.
    * ``'abs_plus_one'``: ``(|g| + 1)²``, what the reference code does: MSE plus a bonus.
    * ``'normalized'``: ``g² / mean(g²)`` over the calibration set: the Fisher's relative
      weighting at the scale of MSE, so λ keeps its meaning (``mean_sq`` = ``mean(g²)``).
    """
    if mode == 'raw':
        return grad.pow(2)
    if mode == 'abs_plus_one':
        return (grad.abs() + 1).pow(2)
    if mode == 'normalized':
        return grad.pow(2) / max(mean_sq, 1e-30)
    raise ValueError(f'quant_cfg.recon.fisher_weight={mode!r}: expected one of {FISHER_WEIGHTS}')


def _scaled_buffer(buf, grad):
    """``buf * grad`` for the scalar incoming gradient; ``buf`` itself when that is exactly 1
    (the usual ``loss.backward()``) and no graph of the gradient is being built."""
    if not torch.is_grad_enabled() and grad.numel() == 1 and float(grad) == 1.0:
        return buf
    return buf * grad


class _WeightedSquaredError(torch.autograd.Function):
    """``sum(w * (out - target)^2) / count`` as one node: the forward keeps ``w * err``,
    the backward is a single scaled copy of it (no pow/mul/sum graph per step).

    Where :func:`mmbrecq.ops.dispatch.select` picks a backend (CPU, float32) the forward is
    one sweep of a compiled kernel: it sums the loss in double and writes
    ``w * err * (2 / count)``, the gradient for an incoming gradient of 1, which the
    backward then returns as it is (or scaled).
    """

    @staticmethod
    def forward(ctx, out, target, weight, count):
        ctx.count = count
        backend = dispatch.select('squared_error', out, target, weight)
        ctx.kernel = backend is not None
        if ctx.kernel:
            total, buf, _ = backend.squared_error_forward(out, target, weight, count,
                                                              need_grad_out=ctx.needs_input_grad[0])
            ctx.save_for_backward(buf)
            return out.new_tensor(total / count)
        err = out - target
        werr = err * weight if weight is not None else err
        ctx.save_for_backward(werr)
        return torch.dot(werr.reshape(-1), err.reshape(-1)) / count

    @staticmethod
    def backward(ctx, grad):
        werr, = ctx.saved_tensors
        if ctx.kernel:  # saved: werr * (2 / count), if out needs a gradient
            return (_scaled_buffer(werr, grad) if werr is not None else None), None, None, None
        return werr * (grad * 2 / ctx.count), None, None, None


def _loss_count(out):
    return out.numel() // out.shape[1] if out.dim() > 1 else out.numel()


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor = None):
    """Squared error (optionally weighted) summed over channels (dim 1), averaged over the
    rest (batch and positions), as in BRECQ."""
    count = _loss_count(out)
    if not (torch.is_grad_enabled() and out.requires_grad) and count > 0:
        backend = dispatch.select('squared_error', out, target, weight)
        if backend is not None:  # nothing to differentiate: the kernel's loss alone, no node
            total = backend.squared_error_forward(out, target, weight, count, need_grad_out=False)[0]
            return out.new_tensor(total / count)
    return _WeightedSquaredError.apply(out.contiguous(), target.contiguous(),
                                       None if weight is None else weight.contiguous(), count)


class _QuantizedSquaredError(torch.autograd.Function):
    """``reconstruction_loss(fq(out), target, weight)`` with the LSQ fake quantizer ``fq``
    of the unit's output inside, as one node computed in one sweep (CPU kernel).

    The loss is a scalar, so the forward already computes everything the backward needs:
    the loss (summed in double), ``d loss / d out = 2 * w * err * inside / count`` (one
    buffer) and ``d loss / d s = grad_factor * sum(2 * w * err * dscale) / count`` (LSQ's
    step gradient, see :func:`mmbrecq.quantizers.functional.fake_quant`); the backward only
    scales them by the incoming gradient: one pass over the activation where the unfused
    composition makes several.
    """

    @staticmethod
    def forward(ctx, backend, out, scale, target, weight, zero_point, qmin, qmax, grad_factor, count):
        need_out, need_scale = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        total, buf, scale_sum = backend.squared_error_forward(
            out, target, weight, count, quant=(scale, zero_point, qmin, qmax), need_grad_out=need_out,
            need_grad_scale=need_scale)
        ctx.save_for_backward(buf)
        ctx.scale_grad, ctx.scale_shape = scale_sum * grad_factor, scale.shape
        return out.new_tensor(total / count)

    @staticmethod
    def backward(ctx, grad):
        buf, = ctx.saved_tensors
        grad_out = _scaled_buffer(buf, grad) if ctx.needs_input_grad[1] else None
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = (grad * ctx.scale_grad).reshape(ctx.scale_shape)
        return None, grad_out, grad_scale, None, None, None, None, None, None, None


def _fused_backend(quantizer, out, target, weight):
    """The backend of the fused node when it reproduces ``quantizer(out)`` exactly: the
    quantizer says it is a plain per-tensor LSQ fake quantizer now (``fusable``) and the
    tensors suit a backend; else ``None``."""
    if not getattr(quantizer, 'fusable', False) or out.dim() < 2 or out.shape[1] == 0:
        return None
    return dispatch.select('quantized_squared_error', out, target, weight,
                           per_tensor=(quantizer.scale, quantizer.zero_point), ints=(quantizer.qmin, quantizer.qmax))


def quantized_reconstruction_loss(out: torch.Tensor, quantizer, target: torch.Tensor,
                                  weight: torch.Tensor = None):
    """``reconstruction_loss(quantizer(out), target, weight)``, fused into one node and one
    sweep over the activations when ``quantizer`` is a per-tensor
    :class:`~mmbrecq.quantizers.LSQQuantizer` and the tensors are float32 on CPU (the
    reconstruction's output quantizer, applied every step). Same values as the composition
    (the loss up to the rounding of its sum, which is done in double; the gradient of
    ``out`` bit for bit for an incoming gradient of 1; the step gradient up to the
    rounding of its sum). In every other case (disabled or uninitialised quantizer, QDrop
    while training, per-channel step, other devices or dtypes, kernels unavailable) it is
    that composition.
    """
    backend = _fused_backend(quantizer, out, target, weight)
    if backend is None:
        return reconstruction_loss(quantizer(out), target, weight)
    scale = quantizer.scale
    grad_factor = quantizer.step_grad_factor(out)
    count = _loss_count(out)
    quant = (scale, quantizer.zero_point, quantizer.qmin, quantizer.qmax)
    if not (torch.is_grad_enabled() and (out.requires_grad or scale.requires_grad)):
        total = backend.squared_error_forward(out, target, weight, count, quant=quant, need_grad_out=False)[0]
        return out.new_tensor(total / count)
    return _QuantizedSquaredError.apply(backend, out, scale, target, weight, quantizer.zero_point, quantizer.qmin,
                                        quantizer.qmax, grad_factor, count)


class RoundingSchedule:
    """AdaRound's β annealing: no regulariser during warm-up, then β linear from b_start to b_end."""

    def __init__(self, iters, warmup=0.2, b_range=(20, 2)):
        self.iters, self.b_start, self.b_end = iters, float(b_range[0]), float(b_range[1])
        self.start = int(warmup * iters)

    def __call__(self, it):
        """β at iteration ``it``, or ``None`` while the regulariser is off."""
        if it < self.start:
            return None
        progress = (it - self.start) / max(1, self.iters - self.start)
        return self.b_end + (self.b_start - self.b_end) * max(0.0, 1 - progress)
