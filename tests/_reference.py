"""Reference formulas the fused nodes are checked against (not used by the package)."""
import torch


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``scale`` (LSQ, Esser et al.):
    composed with ``fake_quant`` it is the unfused LSQ step gradient."""
    y = x * scale
    return x.detach() + (y - y.detach())
