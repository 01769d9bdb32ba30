"""Folding the per-channel scales of post-LayerNorm quantizers into the LayerNorm and the next
Linear (RepQ-ViT's scale reparameterisation; see :mod:`mmbrecq.quantizers.reparam`).

Block rules record which LayerNorm feeds which Linear (:func:`record_post_ln_pair`, names
relative to a module); :func:`calibrate_activations` folds every recorded pair whose Linear
input quantizer was just calibrated per channel. After the fold the model computes the same
function in float (up to float rounding), its quantized version is the per-channel one, and
every activation quantizer is per-tensor, as ONNX QDQ deployment needs.
"""
import torch
from torch import nn

PAIRS_ATTR = '_mmbrecq_post_ln_pairs'


def record_post_ln_pair(module: nn.Module, norm_name: str, linear_name: str):
    """Note that ``module.<norm_name>`` (a LayerNorm) feeds only ``module.<linear_name>``."""
    pairs = module.__dict__.setdefault(PAIRS_ATTR, [])
    if (norm_name, linear_name) not in pairs:
        pairs.append((norm_name, linear_name))


@torch.no_grad()
def fold_post_ln_pair(norm: nn.Module, linear: nn.Module, where: str):
    q = linear.input_quantizer
    if getattr(norm, 'weight', None) is None or getattr(norm, 'bias', None) is None:
        raise ValueError(f'{where}: the LayerNorm has no affine weight and bias to absorb the post-LayerNorm '
                         'scales; use another quant_cfg.transformer.post_ln quantizer')
    r, b = q.fold_to_per_tensor()
    r, b = r.to(norm.weight.dtype), b.to(norm.weight.dtype)
    norm.weight.div_(r)
    norm.bias.div_(r).sub_(b)
    linear.weight.mul_(r)  # (out, in): scales the input channels
    shift = linear.weight @ b
    if linear.bias is None:
        linear.bias = nn.Parameter(shift, requires_grad=False)
    else:
        linear.bias.add_(shift)
    linear.weight_quantizer.init_range(linear.weight)  # the grid of the new weight


def fold_post_ln_scales(model: nn.Module):
    """Fold every recorded LayerNorm -> Linear pair whose input quantizer awaits it; return
    the number of pairs folded."""
    folded = 0
    for name, module in model.named_modules():
        for norm_name, linear_name in module.__dict__.get(PAIRS_ATTR, ()):
            linear = module.get_submodule(linear_name)
            if getattr(getattr(linear, 'input_quantizer', None), 'pending_fold', False):
                where = f'{name}.{norm_name} -> {name}.{linear_name}' if name else f'{norm_name} -> {linear_name}'
                fold_post_ln_pair(module.get_submodule(norm_name), linear, where)
                folded += 1
    return folded
