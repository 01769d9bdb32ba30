"""The reconstruction objective: output error (optionally Fisher-weighted) + rounding term."""
import torch

from mmbrecq.ops import cpu_kernels

FISHER_WEIGHTS = ('normalized', 'abs_plus_one', 'raw')


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


def _loss_kernel_applies(out, target, weight):
    """Whether the squared-error nodes may run the fused CPU kernel: float32 CPU tensors of
    one shape, not under tracing / compilation, kernels built (see :mod:`mmbrecq.ops`)."""
    return cpu_kernels.kernels_apply(out, target, weight)


def _scaled_buffer(buf, grad):
    """``buf * grad`` for the scalar incoming gradient; ``buf`` itself when that is exactly 1
    (the usual ``loss.backward()``) and no graph of the gradient is being built."""
    if not torch.is_grad_enabled() and grad.numel() == 1 and float(grad) == 1.0:
        return buf
    return buf * grad


class _WeightedSquaredError(torch.autograd.Function):
    """``sum(w * (out - target)^2) / count`` as one node: the forward keeps ``w * err``,
    the backward is a single scaled copy of it (no pow/mul/sum graph per step).

    On CPU (float32) the forward is one sweep of a compiled kernel (about 8 ms of torch
    passes on a 32x64x56x56 activation otherwise, see :mod:`mmbrecq.ops.cpu_kernels`): it
    sums the loss in double and writes ``w * err * (2 / count)``, the gradient for an
    incoming gradient of 1, which the backward then returns as it is (or scaled).
    """

    @staticmethod
    def forward(ctx, out, target, weight, count):
        ctx.count = count
        ctx.kernel = _loss_kernel_applies(out, target, weight)
        if ctx.kernel:
            total, buf, _ = cpu_kernels.squared_error_forward(out, target, weight, count,
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
    if not (torch.is_grad_enabled() and out.requires_grad) and count > 0 \
            and _loss_kernel_applies(out, target, weight):
        # nothing to differentiate: the kernel's loss alone, no gradient buffer, no node
        total = cpu_kernels.squared_error_forward(out, target, weight, count, need_grad_out=False)[0]
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
    scales them by the incoming gradient. Unfused, the same step costs the fake-quant
    node's ~14 ms + 5 ms and the loss node's ~8 ms of passes over a 32x64x56x56 activation.
    """

    @staticmethod
    def forward(ctx, out, scale, target, weight, zero_point, qmin, qmax, grad_factor, count):
        need_out, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, buf, scale_sum = cpu_kernels.squared_error_forward(
            out, target, weight, count, quant=(scale, zero_point, qmin, qmax), need_grad_out=need_out,
            need_grad_scale=need_scale)
        ctx.save_for_backward(buf)
        ctx.scale_grad, ctx.scale_shape = scale_sum * grad_factor, scale.shape
        return out.new_tensor(total / count)

    @staticmethod
    def backward(ctx, grad):
        buf, = ctx.saved_tensors
        grad_out = _scaled_buffer(buf, grad) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * ctx.scale_grad).reshape(ctx.scale_shape)
        return grad_out, grad_scale, None, None, None, None, None, None, None


def _fused_quantizer_applies(quantizer, out, target, weight):
    """The fused node reproduces ``quantizer(out)`` exactly when ``quantizer`` is an enabled,
    initialised, per-tensor LSQ quantizer (class methods not overridden, no hooks) without
    QDrop in training, and the tensors suit the CPU kernel."""
    from mmbrecq.quantizers.lsq import LSQQuantizer
    from mmbrecq.quantizers.uniform import UniformQuantizer
    cls = type(quantizer)
    if not (isinstance(quantizer, LSQQuantizer) and cls.quantize is LSQQuantizer.quantize
            and cls.forward is UniformQuantizer.forward and cls._broadcast is UniformQuantizer._broadcast):
        return False
    if not quantizer.enabled or not quantizer.initialized:
        return False
    if quantizer.drop_prob > 0 and quantizer.training:
        return False
    if quantizer._forward_hooks or quantizer._forward_pre_hooks or torch.nn.modules.module._global_forward_hooks \
            or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    if quantizer.ch_axis is not None or out.dim() < 2 or out.shape[1] == 0:
        return False
    return cpu_kernels.kernels_apply(out, target, weight, per_tensor=(quantizer.scale, quantizer.zero_point))


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
    if not _fused_quantizer_applies(quantizer, out, target, weight):
        return reconstruction_loss(quantizer(out), target, weight)
    scale = quantizer.scale
    grad_factor = quantizer.step_grad_factor(out)
    count = _loss_count(out)
    quant = (scale, quantizer.zero_point, quantizer.qmin, quantizer.qmax)
    if not (torch.is_grad_enabled() and (out.requires_grad or scale.requires_grad)):
        total = cpu_kernels.squared_error_forward(out, target, weight, count, quant=quant, need_grad_out=False)[0]
        return out.new_tensor(total / count)
    return _QuantizedSquaredError.apply(out, scale, target, weight, quantizer.zero_point, quantizer.qmin,
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
