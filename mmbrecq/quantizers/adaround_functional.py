"""AdaRound's soft weight and rounding regulariser, each as one autograd node.

Written as compositions (``sigmoid → affine → clamp → + floor(w/s) → clamp → scale`` and
``1 - |2h - 1|^β``) autograd records ~10 nodes per layer and replays as many backward
kernels, each a pass over all the weights, every reconstruction step. Here the forward
computes, under no-grad, the value *and* its derivative w.r.t. ``alpha`` (everything
else is constant while a unit is optimised), so the graph holds one node and the
backward is a single multiply. Where :func:`mmbrecq.ops.dispatch.select` picks a backend
(CPU), the elementwise glue around torch's vectorised sigmoid and pow is one sweep of a
compiled kernel. The
soft weight equals the composed formula bit for bit, the gradients up to the order of
the float multiplications (tests/test_quantizers_adaround_functional.py compares them).
"""
import torch

from mmbrecq.ops import dispatch


def rectified_sigmoid(alpha, zeta, gamma):
    """``(h, dh/dalpha)``: ``h = clamp(sigmoid(alpha)(zeta-gamma)+gamma, 0, 1)``; the
    derivative is zero where the clamp is active (as autograd's clamp backward)."""
    sig = torch.sigmoid(alpha)
    h = sig * (zeta - gamma)
    h.add_(gamma)
    dh = sig.mul_(1 - sig).mul_(zeta - gamma)
    dh.mul_((h >= 0) & (h <= 1))
    return h.clamp_(0, 1), dh


def _times(saved, grad):
    """``saved * grad``, written over ``saved`` (a buffer only this node holds) unless a
    graph of the gradient is being built; its version is bumped, so that a second backward
    through the same graph fails loudly instead of reading the overwritten buffer."""
    if torch.is_grad_enabled():
        return saved * grad
    torch.autograd.graph.increment_version(saved)
    return saved.mul_(grad)


class _SoftWeight(torch.autograd.Function):
    """``s * (clamp(floor(w/s) + h(alpha) + z, qmin, qmax) - z)``, differentiable in alpha."""

    @staticmethod
    def forward(ctx, alpha, w, scale, zero_point, qmin, qmax, zeta, gamma):
        backend = dispatch.select('adaround_soft', alpha, w, ints=(qmin, qmax), contiguous=(alpha, ))
        grid = backend.adaround_channels(alpha, w, scale, zero_point) if backend is not None else None
        if grid is not None:  # one sweep after torch's sigmoid, same operations and order
            out, dw_dalpha = backend.adaround_soft_forward(alpha, w, *grid, qmin, qmax, zeta, gamma)
            ctx.save_for_backward(dw_dalpha)
            return out
        h, dh = rectified_sigmoid(alpha, zeta, gamma)
        q = torch.floor(w / scale).add_(h).add_(zero_point)
        dh.mul_((q >= qmin) & (q <= qmax)).mul_(scale)   # d w_q / d alpha
        ctx.save_for_backward(dh)
        return q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        dw_dalpha, = ctx.saved_tensors
        return _times(dw_dalpha, grad), None, None, None, None, None, None, None


def soft_weight(alpha, w, scale, zero_point, qmin, qmax, zeta, gamma):
    """The soft-rounded weight; ``scale``/``zero_point`` broadcast against ``w`` (detached)."""
    return _SoftWeight.apply(alpha, w.detach(), scale.detach(), zero_point.detach(), qmin, qmax, zeta, gamma)


class _RoundingLoss(torch.autograd.Function):
    """``sum(1 - |2h(alpha) - 1|^beta)`` and, computed in the same pass, its gradient."""

    @staticmethod
    def forward(ctx, alpha, zeta, gamma, beta):
        backend = dispatch.select('adaround_rounding_loss', alpha, contiguous=(alpha, ))
        if backend is not None:
            # |2h-1|^beta as |2h-1| * |2h-1|^(beta-1) (the pow the gradient needs anyway)
            loss, grad = backend.adaround_rounding_loss(alpha, zeta, gamma, beta)
            ctx.save_for_backward(grad)
            return alpha.new_tensor(loss)
        h, dh = rectified_sigmoid(alpha, zeta, gamma)
        t = h.mul_(2).sub_(1)
        a = t.abs()
        loss = (1 - a.pow(beta)).sum()
        # d/dh (1 - |2h-1|^beta) = -2 beta |2h-1|^(beta-1) sign(2h-1)
        ctx.save_for_backward(dh.mul_(a.pow_(beta - 1)).mul_(t.sign_()).mul_(-2 * beta))
        return loss

    @staticmethod
    def backward(ctx, grad):
        dloss_dalpha, = ctx.saved_tensors
        return _times(dloss_dalpha, grad), None, None, None


def rounding_loss(alpha, zeta, gamma, beta):
    return _RoundingLoss.apply(alpha, zeta, gamma, float(beta))
