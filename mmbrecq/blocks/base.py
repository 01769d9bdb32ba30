"""Block rules: which float modules form one reconstruction unit, and where quantizers sit.

A rule names the float block classes it handles (by import path, resolved lazily so
that mmbrecq imports without mmdet), and decides the activation quantizers of a unit:

* one quantizer on the block's input, applied once by a forward pre-hook. It is the
  quantizer "after the previous block's add+ReLU", shared by every branch that reads
  the block input (main path and shortcut), so both branches see the same integers;
* one on the input of every inner layer that does not read the block input, i.e.
  "after each activation inside the block".

Supporting a new architecture means registering a rule, not editing the core::

    @BLOCK_RULES.register_module()
    class MyBlockRule(ResidualBlockRule):
        block_types = ('my_pkg.models.MyBlock', )
"""
import importlib

from torch import nn


def _resolve(path: str):
    module_name, _, attr = path.rpartition('.')
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


class BlockRule:
    """Base rule: a block is one unit; the first inner layer reads the block input."""

    #: import paths of the float block classes (subclasses match too)
    block_types: tuple = ()
    #: children whose layers read the block input too (e.g. the residual shortcut)
    shortcut_prefixes: tuple = ()
    #: what the unit is called in logs
    kind: str = 'block'
    #: whether the block input gets one quantizer (a pre-hook) shared by the layers that read
    #: it; ``False``: each inner layer quantizes its own input (transformers, whose residual
    #: stream stays float)
    quantize_input: bool = True
    #: the parsed ``quant_cfg`` (set by ``quantize_model``), for rules with options
    qcfg = None

    def resolved_types(self):
        return tuple(t for t in (_resolve(p) for p in self.block_types) if t is not None)

    def matches(self, module: nn.Module) -> bool:
        types = self.resolved_types()
        return bool(types) and isinstance(module, types)

    def match(self, parent: nn.Module, name: str, module: nn.Module) -> bool:
        """Whether ``parent.<name>`` is a block of this rule (default: by ``block_types``).
        Rules that need the context (which head a list of convs belongs to) override it."""
        return self.matches(module)

    def prepare(self, parent: nn.Module, name: str, module: nn.Module) -> nn.Module:
        """The module that becomes the unit (default: the block itself, untouched)."""
        return module

    def layer_tail(self, parent: nn.Module, name: str):
        """Names of ``parent``'s parameter-free children that the model applies right after
        the single layer ``parent.<name>`` (in order), or ``None``.

        A layer unit with a tail is reconstructed on the tail's output. This is for layers
        followed by fixed monotone ops before the next block (a ResNet stem: conv → BN →
        ReLU → max-pool → ``layer1``): the next block's input is then the unit's output, so
        this unit learns that block's input step (no input-gradient convolution in the
        block's every step). The probe checks that the model really runs the tail.
        """
        return None

    def input_kind(self, block: nn.Module, layer_name: str):
        """Tensor kind of the input of ``block.<layer_name>`` (``quant_cfg.transformer`` may
        give that kind its own quantizer type), or ``None`` for the default."""
        return None

    def attach_quantizers(self, block: nn.Module, make_act):
        """Add quantizers on tensors that are no layer's input (called after the layers are
        swapped); ``make_act(kind)`` builds one at the block's activation bits, or ``None``
        when activations stay float. Default: none."""

    def entry_layers(self, block: nn.Module, layer_names):
        """Names (relative to the block, in registration order) of layers fed by the input."""
        if not layer_names:
            return []
        entries = [layer_names[0]]
        for name in layer_names[1:]:
            if any(name == p or name.startswith(p + '.') for p in self.shortcut_prefixes):
                entries.append(name)
        return entries


class ResidualBlockRule(BlockRule):
    """ResNet-style blocks: ``conv1`` and the ``downsample`` shortcut read the input."""

    shortcut_prefixes = ('downsample', )


class ResNetStemRule(BlockRule):
    """The plain ResNet stem ``conv1 → norm1 → relu → maxpool`` (not ``deep_stem``): the
    conv is a layer unit whose tail is the BN (folded to identity), ReLU and max-pool,
    the exact sequence ``ResNet.forward`` runs before ``layer1``."""

    backbone_types: tuple = ()
    kind = 'ResNetStem'

    def layer_tail(self, parent, name):
        types = tuple(t for t in (_resolve(p) for p in self.backbone_types) if t is not None)
        if name != 'conv1' or not types or not isinstance(parent, types) or getattr(parent, 'deep_stem', True):
            return None
        # RegNet and the CIFAR ResNet have no max-pool: their stem ends at the ReLU
        names = (parent.norm1_name, 'relu', 'maxpool')
        return tuple(n for n in names if isinstance(getattr(parent, n, None), nn.Module))
