"""Differentiable building blocks shared by every quantizer.

Kept as plain functions so the quantizer classes read like the formulas in the
paper, and so the gradient rules (straight-through rounding, LSQ gradient scale)
are tested once, here.
"""
import torch

from mmbrecq.ops import dispatch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (d round(x)/dx := 1)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
               qmax: int) -> torch.Tensor:
    """Quantize then dequantize: ``(clamp(round(x/s) + z, qmin, qmax) - z) * s``.

    ``scale``/``zero_point`` broadcast against ``x``. Rounding is straight-through, the
    clamp passes no gradient to ``x`` outside the grid, and the gradient that reaches
    ``scale`` is LSQ's: ``round(x/s) - x/s`` inside the grid, ``qmin - z`` or ``qmax - z``
    outside.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                       symmetric: bool, eps: float = 1e-8):
    """Scale and integer zero point that map ``[lo, hi]`` (element-wise) onto the grid.

    The range is first widened to contain 0 so that zero is exactly representable
    (zero padding and ReLU outputs stay exact).
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        if qmin < 0:
            amax = torch.maximum(-lo, hi)
            scale = (amax / qmax).clamp_min(eps)
        else:  # unsigned symmetric grid: [0, hi]
            scale = (hi / qmax).clamp_min(eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def lp_error(x: torch.Tensor, y: torch.Tensor, p: float, dim=None) -> torch.Tensor:
    """Sum of ``|x - y|^p`` (over ``dim`` or all elements)."""
    err = (x - y).abs().pow(p)
    return err.sum() if dim is None else err.sum(dim=dim)


def _backend(x, scale, zero_point, qmin, qmax):
    return dispatch.select('fake_quant', x, per_tensor=(scale, zero_point), ints=(qmin, qmax))


class _FakeQuantLSQ(torch.autograd.Function):
    """``fake_quant`` with LSQ's step gradient as one autograd node.

    Same values and gradients as the composition in :func:`fake_quant` (straight-through
    rounding, no input gradient outside the grid, LSQ step gradient times
    ``grad_factor``), but the graph holds one node instead of seven, so the backward is
    one multiply and one reduction. This runs on every activation of every reconstruction
    step: its memory traffic is the per-iteration overhead.

    Where :func:`mmbrecq.ops.dispatch.select` picks a backend (CPU, float32, per-tensor
    step), the forward and the backward are each one sweep of a compiled kernel instead of
    the torch code's bool-mask passes and fresh buffers (``benchmarks/bench_fused_kernels.py``
    measures both). The forward then writes only its output and keeps the input ``x``; the
    backward recomputes the grid mask and the step's local gradient from it in its sweep
    (reading one tensor instead of writing and reading two). ``x`` is saved as autograd
    saves any input, so an in-place change of it before the backward raises PyTorch's
    "modified by an inplace operation" error rather than giving a wrong gradient. The
    kernel's values are the torch code's bit for bit; the step gradient is summed in double.
    The torch code keeps what its backward needs (the grid mask and the step's local
    gradient).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):
        ctx.scale_shape, ctx.grad_factor = scale.shape, grad_factor
        ctx.kernel = _backend(x, scale, zero_point, qmin, qmax)
        if ctx.kernel is not None:
            ctx.grid = (float(scale), float(zero_point), qmin, qmax)
            # a strided input (Q, K, V are views of the qkv output) is made dense once, for the
            # forward sweep and the backward's alike
            x = ctx.kernel.dense(x)
            ctx.save_for_backward(x)
            return ctx.kernel.fake_quant_forward(x, *ctx.grid)[0]
        inside, q, xs = _grid(x, scale, zero_point, qmin, qmax)
        out = q * scale
        if ctx.needs_input_grad[1]:
            # d out / d scale: round(x/s) - x/s inside the grid, (qmin|qmax) - z outside
            ctx.save_for_backward(inside, q.sub_(xs.mul_(inside)))
        else:
            ctx.save_for_backward(inside, None)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.kernel is not None:
            x, = ctx.saved_tensors
            if not torch.is_grad_enabled() and dispatch.select('fake_quant', grad) is ctx.kernel:
                grad_x, total = ctx.kernel.fake_quant_backward_x(grad, x, *ctx.grid, ctx.needs_input_grad[0],
                                                                 ctx.needs_input_grad[1])
                grad_s = grad.new_full(ctx.scale_shape, total * ctx.grad_factor) if ctx.needs_input_grad[1] else None
                return grad_x, grad_s, None, None, None, None
            inside, dscale = _local_gradients(x, *ctx.grid)  # a double backward: the torch code
        else:
            inside, dscale = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if dscale is not None and ctx.needs_input_grad[1]:
            grad_s = (grad * dscale).sum_to_size(ctx.scale_shape) * ctx.grad_factor
        return grad_x, grad_s, None, None, None, None


def _grid(x, scale, zero_point, qmin, qmax):
    """``(inside, q, x / s)``: the grid mask and the integer offset ``q`` from the zero point."""
    xs = x / scale
    q = torch.round(xs).add_(zero_point)
    inside = (q >= qmin).logical_and_(q <= qmax)
    return inside, q.clamp_(qmin, qmax).sub_(zero_point), xs


def _local_gradients(x, scale, zero_point, qmin, qmax):
    """The grid mask and ``d out / d scale`` of :class:`_FakeQuantLSQ`'s torch code, for ``x``."""
    inside, q, xs = _grid(x, scale, zero_point, qmin, qmax)
    return inside, q.sub_(xs.mul_(inside))


def fake_quant_lsq(x, scale, zero_point, qmin, qmax, grad_factor=1.0):
    """Fused :func:`fake_quant` whose step gradient is scaled by ``grad_factor`` (LSQ).

    (PyTorch's own ``_fake_quantize_learnable_per_tensor_affine`` is not used: it rounds
    ``x * (1/s)`` instead of ``x / s``, and was measured slower than this node on CPU.)

    Without any gradient to compute (grad mode off, or neither ``x`` nor ``scale``
    requiring one) the CPU kernel gives just the output, with no autograd node.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or getattr(scale, 'requires_grad', False))):
        backend = _backend(x, scale, zero_point, qmin, qmax)
        if backend is not None:
            return backend.fake_quant_forward(x, scale, zero_point, qmin, qmax)[0]
    return _FakeQuantLSQ.apply(x, scale, zero_point, qmin, qmax, grad_factor)
