"""No silent fallback: tell the user which block-like modules no block rule covers.

A block class without a rule is not an error: its layers become single-layer units and
are reconstructed one by one (layer-wise AdaRound), which runs but is not BRECQ. Users
pick MobileNets and ConvNeXts for deployment, so a missing rule must not go unnoticed.

Without tracing, "looks like a block" is decided from the module tree alone: a module
that holds at least two quantized layers, none of them in a block unit, and whose class
occurs at least twice in the model (networks stack their blocks; a neck or a head is
one module). Generic containers (``Sequential``, ``ModuleList``, ``ModuleDict``: a stage
of blocks) are not blocks themselves, and only the outermost such module is named (an
unknown block with an SE branch is reported as the block, not as its SE layer), unless
it holds several modules of one such class itself: then it is a stage of blocks, like
DenseNet's ``DenseBlock`` of ``DenseLayer``s, and the blocks inside are named.
"""
import logging
from collections import defaultdict

from mmengine.logging import print_log
from torch import nn

from .marks import UNIT_ATTR
from .quant_layers import QuantLayerMixin

#: where the README explains how to register a rule
README_SECTION = 'README.md, "Block rules for mmpretrain families"'
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _qualname(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


def _unit_names(model):
    """``(block unit names, layer unit names)`` from the marks ``quantize_model`` leaves."""
    blocks, layers = [], []
    for name, m in model.named_modules():
        if getattr(m, UNIT_ATTR, None) is not None:
            (layers if isinstance(m, QuantLayerMixin) else blocks).append(name)
    return blocks, layers


def uncovered_blocks(model: nn.Module):
    """``{class import path: [module names]}`` of the block-like modules of a swapped model
    that no rule covers."""
    blocks, layers = _unit_names(model)

    def inside(name, prefix):
        return not prefix or name.startswith(prefix + '.')

    candidates = {}
    for name, m in model.named_modules():
        if not name or isinstance(m, _CONTAINERS):
            continue
        if any(name == b or inside(name, b) or inside(b, name) for b in blocks):
            continue  # a block unit, inside one, or holding one (a backbone, a stage)
        if sum(inside(n, name) for n in layers) >= 2:
            candidates[name] = type(m)
    by_class = defaultdict(list)
    for name, cls in candidates.items():
        by_class[cls].append(name)
    repeated = {n for names in by_class.values() if len(names) >= 2 for n in names}
    # a custom stage class (DenseNet's DenseBlock) holds several blocks of one class: not a block
    stages = {n for n in repeated
              if any(sum(inside(o, n) and o != n for o in names) >= 2 for names in by_class.values())}
    blocks_like = repeated - stages
    # outermost only: a repeated candidate inside another one is part of that block (an SE layer)
    outer = [n for n in blocks_like if not any(o != n and inside(n, o) for o in blocks_like)]
    found = defaultdict(list)
    for name in sorted(outer, key=list(candidates).index):
        found[_qualname(candidates[name])].append(name)
    return dict(found)


def warn_uncovered_blocks(model: nn.Module, logger='current'):
    """Log one warning per block-like class that no rule covers; return what was found."""
    found = uncovered_blocks(model)
    _, layers = _unit_names(model)
    for path, names in found.items():
        n_layers = sum(1 for u in layers if any(u.startswith(n + '.') for n in names))
        shown = ', '.join(names[:3]) + (f', ... ({len(names)} in all)' if len(names) > 3 else '')
        print_log(
            f'no block rule covers {path} ({shown}): its {n_layers} quantized layers are reconstructed one '
            f'by one (layer-wise AdaRound, not BRECQ blocks). To reconstruct each as one block, register a '
            f"rule: @BLOCK_RULES.register_module() class MyRule(BlockRule): block_types = ('{path}', ) "
            f'(see {README_SECTION})', logger=logger, level=logging.WARNING)
    return found
