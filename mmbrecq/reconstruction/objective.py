"""The reconstruction objective: output error (optionally Fisher-weighted) + rounding term."""
import torch

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


class _WeightedSquaredError(torch.autograd.Function):
    """``sum(w * (out - target)^2) / count`` as one node: the forward keeps ``w * err``,
    the backward is a single scaled copy of it (no pow/mul/sum graph per step)."""

    @staticmethod
    def forward(ctx, out, target, weight, count):
        err = out - target
        werr = err * weight if weight is not None else err
        ctx.save_for_backward(werr)
        ctx.count = count
        return torch.dot(werr.reshape(-1), err.reshape(-1)) / count

    @staticmethod
    def backward(ctx, grad):
        werr, = ctx.saved_tensors
        return werr * (grad * 2 / ctx.count), None, None, None


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor = None):
    """Squared error (optionally weighted) summed over channels (dim 1), averaged over the
    rest (batch and positions), as in BRECQ."""
    count = out.numel() // out.shape[1] if out.dim() > 1 else out.numel()
    return _WeightedSquaredError.apply(out.contiguous(), target.contiguous(),
                                       None if weight is None else weight.contiguous(), count)


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
