"""Folding the per-channel scales of post-LayerNorm quantizers into the LayerNorm and the next
Linear (RepQ-ViT's scale reparameterisation; see :mod:`mmbrecq.quantizers.reparam`).

Block rules record which LayerNorm feeds which Linear (:func:`record_post_ln_pair`, names
relative to a module); :func:`calibrate_activations` folds every recorded pair whose Linear
input quantizer was just calibrated per channel. After the fold the model computes the same
function in float (up to float rounding), its quantized version is the per-channel one, and
every activation quantizer is per-tensor, as ONNX QDQ deployment needs.

A pair folds without a shift (only the per-channel factor, no new Linear bias) when the rule
recorded it with ``shift=False`` (Swin's ``norm1``: the window attention zero-pads between the
two) or when the Linear has no bias: the folded model keeps exactly the float model's
parameters, so its quantized checkpoint, integer checkpoint and baked float checkpoint load
into the float architecture. :func:`plan_post_ln_folds` tells those quantizers before
calibration, so that the per-channel grids calibration draws are already the shift-free ones.
"""
import torch
from torch import nn

PAIRS_ATTR = '_mmbrecq_post_ln_pairs'


def record_post_ln_pair(module: nn.Module, norm_name: str, linear_name: str, shift: bool = True):
    """Note that ``module.<norm_name>`` (a LayerNorm) feeds only ``module.<linear_name>``;
    ``shift=False``: fold it without a shift (something between the two relies on a zero
    LayerNorm output meaning zero, e.g. zero padding)."""
    pairs = module.__dict__.setdefault(PAIRS_ATTR, [])
    pairs[:] = [p for p in pairs if p[:2] != (norm_name, linear_name)]
    pairs.append((norm_name, linear_name, shift))


def _needs_no_shift(linear: nn.Module, shift: bool) -> bool:
    return not shift or linear.bias is None


def _recorded_pairs(model: nn.Module):
    """``(where, module, norm name, linear name, shift)`` of every recorded pair under ``model``."""
    for name, module in model.named_modules():
        for norm_name, linear_name, shift in module.__dict__.get(PAIRS_ATTR, ()):
            where = f'{name}.{norm_name} -> {name}.{linear_name}' if name else f'{norm_name} -> {linear_name}'
            yield where, module, norm_name, linear_name, shift


def plan_post_ln_folds(model: nn.Module):
    """Before calibration: make the post-LayerNorm quantizers of pairs that fold without a
    shift draw shift-free per-channel grids; return how many."""
    planned = 0
    for _, module, _, linear_name, shift in _recorded_pairs(model):
        linear = module.get_submodule(linear_name)
        q = getattr(linear, 'input_quantizer', None)
        if hasattr(q, 'set_shift_free') and not q.folded and _needs_no_shift(linear, shift):
            q.set_shift_free()
            planned += 1
    return planned


@torch.no_grad()
def fold_post_ln_pair(norm: nn.Module, linear: nn.Module, where: str, shift: bool = True):
    """Fold ``linear``'s per-channel input grid into ``norm`` and ``linear`` (module docstring).
    Without a shift (``shift=False`` or a bias-free ``linear``) no bias is added: the Linear
    keeps ``bias=None``."""
    q = linear.input_quantizer
    if getattr(norm, 'weight', None) is None or getattr(norm, 'bias', None) is None:
        raise ValueError(f'{where}: the LayerNorm has no affine weight and bias to absorb the post-LayerNorm '
                         'scales; use another quant_cfg.transformer.post_ln quantizer')
    if _needs_no_shift(linear, shift) and not q.shift_free:
        q.set_shift_free()  # calibrated without plan_post_ln_folds: its grid is redrawn now
    r, b = q.fold_to_per_tensor()
    r, b = r.to(norm.weight.dtype), b.to(norm.weight.dtype)
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(b)
    linear.weight.mul_(r)  # (out, in): scales the input channels
    if linear.bias is not None:
        linear.bias.add_(linear.weight @ b)
    elif bool(b.any()):  # set_shift_free guarantees b == 0
        raise RuntimeError(f'{where}: a bias-free Linear was given a non-zero post-LayerNorm shift')
    linear.weight_quantizer.init_range(linear.weight)  # the grid of the new weight


def fold_post_ln_scales(model: nn.Module):
    """Fold every recorded LayerNorm -> Linear pair whose input quantizer awaits it; return
    the number of pairs folded."""
    folded = 0
    for where, module, norm_name, linear_name, shift in list(_recorded_pairs(model)):
        linear = module.get_submodule(linear_name)
        if getattr(getattr(linear, 'input_quantizer', None), 'pending_fold', False):
            fold_post_ln_pair(module.get_submodule(norm_name), linear, where, shift)
            folded += 1
    return folded
