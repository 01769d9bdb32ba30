"""Fold eval-mode BatchNorm into the convolution that feeds it.

Deployed integer kernels see the folded weights, so they are what must be quantized.
Pairs are found structurally, without tracing: a ``_BatchNorm`` child registered right
after a conv child of the same parent with matching channels. That is how
``nn.Sequential``, mmcv's ``ConvModule`` (conv-before-norm order) and the OpenMMLab
ResNet family (``conv1``/``bn1``…) are built. The BN is replaced by ``nn.Identity`` so
attribute access (``block.norm1``) keeps working.
"""
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm):
    """Fold ``bn`` into ``conv`` in place (``conv`` gains a bias if it had none).

    ``w * gamma / sqrt(var + eps)``, as BRECQ's reference code folds. (torch's
    ``torch.nn.utils.fusion.fuse_conv_bn_weights`` multiplies by ``rsqrt(var + eps)``
    instead, which differs in the last bit of most folded weights and so moves every
    measured result of the digits demos.)
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    conv.weight.mul_(factor.view(-1, *([1] * (conv.weight.dim() - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter(((bias - bn.running_mean) * factor + beta).to(conv.weight.dtype))


def conv_before_norm(parent: nn.Module) -> bool:
    """Whether ``parent`` runs a conv child right before the norm child registered after it
    (mmcv's ``ConvModule`` says so in ``order``; plain modules are assumed to)."""
    order = getattr(parent, 'order', None)  # mmcv ConvModule
    if isinstance(order, (tuple, list)) and 'conv' in order and 'norm' in order:
        return order.index('norm') == order.index('conv') + 1  # adjacent: nothing in between
    return True


def adjacent_children(model: nn.Module):
    """``(conv name, conv, next name, next module)`` for every child registered right after
    another in a parent that runs its conv before its norm (full dotted names): where a
    folded or foldable conv → BN pair sits."""
    for parent_name, parent in model.named_modules():
        if not conv_before_norm(parent):
            continue
        prefix = f'{parent_name}.' if parent_name else ''
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            yield prefix + a_name, a, prefix + b_name, b


def fold_bn(model: nn.Module):
    """Fold every foldable conv→BN pair of ``model`` in place; return the folded names.

    The model must be in eval mode (running statistics are what get folded).
    """
    if model.training:
        raise RuntimeError('fold_bn needs model.eval(): BatchNorm is folded with its running stats')
    folded = []
    for conv_name, conv, bn_name, bn in list(adjacent_children(model)):
        if (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm)
                and bn.num_features == conv.out_channels and bn.track_running_stats):
            fold_conv_bn(conv, bn)
            model.set_submodule(bn_name, nn.Identity())
            folded.append((conv_name, bn_name))
    return folded
