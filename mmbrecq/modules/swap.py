"""Eager swap of a float model into a quantized one, by block rules.

``quantize_model`` edits the user's own module tree in place: BN folded, Conv2d/Linear
replaced by their quantized twins, activation quantizers placed by the block rules.
Nothing is traced and nothing global is patched, so mmdet heads, RoI code and the
``loss``/``predict``/``tensor`` modes of the model keep working on the same tree.
"""
from dataclasses import dataclass

import torch
from torch import nn

from mmbrecq.quantizers import UniformQuantizer
from mmbrecq.registry import BLOCK_RULES, QUANTIZERS, build_from
from .bn_fold import fold_bn
from .quant_config import QuantConfig
from .quant_layers import QuantLayerMixin, quant_twin
from .reparam import fold_post_ln_scales
from mmbrecq.utils.dist import shard_range_init

UNIT_ATTR = '_mmbrecq_unit_kind'
TAIL_ATTR = '_mmbrecq_unit_tail'


@dataclass
class Unit:
    """One reconstruction unit: a block (several layers) or a single layer.

    ``tail``: parameter-free modules that the model runs right after the unit (a ResNet
    stem conv's BN, ReLU and max-pool; see :meth:`BlockRule.layer_tail`). The unit's
    output is then the tail's output: the next block reads it directly, so the stem
    learns that block's input step, as every block learns its successor's.
    """
    name: str
    module: nn.Module
    kind: str
    tail: tuple = ()

    @property
    def is_block(self):
        return not isinstance(self.module, QuantLayerMixin)

    @property
    def exit(self) -> nn.Module:
        """The module whose output is the unit's output (where output hooks go)."""
        return self.tail[-1] if self.tail else self.module

    def forward(self, x):
        x = self.module(x)
        for m in self.tail:
            x = m(x)
        return x


def _quantize_block_input(block, args):
    """Forward pre-hook: the block's input quantizer, applied once for all its branches."""
    if not args:
        return None
    return (block.input_quantizer(args[0]), ) + tuple(args[1:])


def _build_rules(names, qcfg):
    if names is None:
        names = list(BLOCK_RULES.module_dict)
    rules = []
    for n in names:
        if n not in BLOCK_RULES.module_dict and BLOCK_RULES.get(n) is None:
            raise ValueError(f'quant_cfg.block_rules: unknown rule {n!r}; registered rules: '
                             f'{sorted(BLOCK_RULES.module_dict)}')
        rule = build_from(BLOCK_RULES, dict(type=n))
        rule.qcfg = qcfg  # rules with options (quant_cfg.transformer) read them here
        rules.append(rule)
    return rules


class _QuantizerFactory:
    """Builds weight/activation quantizers from ``quant_cfg``, with errors naming the key."""

    def __init__(self, qcfg: QuantConfig):
        self.w_cfg = dict(qcfg['weight_quantizer'])
        self.a_cfg = dict(qcfg['act_quantizer'])
        # activation quantizers per tensor kind (None: act_quantizer); see quant_config.TENSOR_KINDS
        self.kind_cfgs = {k: dict(c) for k, c in qcfg.kind_quantizers().items()}
        named = [('weight_quantizer', self.w_cfg), ('act_quantizer', self.a_cfg)]
        named += [(f'transformer.{k}', c) for k, c in self.kind_cfgs.items()]
        for key, c in named:
            if QUANTIZERS.get(c['type']) is None:
                raise ValueError(f'quant_cfg.{key}.type={c["type"]!r} is not a registered quantizer; '
                                 f'registered: {sorted(QUANTIZERS.module_dict)}')

    def weight(self, layer, bits):
        cfg = dict(self.w_cfg, bits=bits, num_channels=layer.weight.shape[0], ch_axis=0)
        if QUANTIZERS.get(cfg['type']).__name__ == 'AdaRoundQuantizer':
            cfg['weight_shape'] = tuple(layer.weight.shape)
        q = build_from(QUANTIZERS, cfg).to(layer.weight.device)
        q.role = 'weight'
        q.init_range(layer.weight)
        return q

    def act(self, bits, device, kind=None):
        """An activation quantizer at ``bits`` (``None``: float) for a tensor of ``kind``."""
        if bits is None:
            return None
        q = build_from(QUANTIZERS, dict(self.kind_cfgs.get(kind, self.a_cfg), bits=bits)).to(device)
        q.role = 'act'
        return q


def _set_submodule(model, name, new):
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, quant_cfg) -> nn.Module:
    """Swap ``model`` (in place) into its fake-quantized twin; return it.

    Weight ranges are initialised here (they depend only on the weights); activation
    ranges need data: see :func:`mmbrecq.calibrate_activations`.
    """
    qcfg = quant_cfg if isinstance(quant_cfg, QuantConfig) else QuantConfig(quant_cfg)
    # every check first: a config error must leave the user's model untouched
    rules = _build_rules(qcfg['block_rules'], qcfg)
    factory = _QuantizerFactory(qcfg)
    layer_names = [n for n, m in model.named_modules() if quant_twin(m) is not None]
    if not layer_names:
        raise ValueError(f'{type(model).__name__} has no Conv2d/Linear layer to quantize')
    qcfg.check_patterns(layer_names)
    kept = [n for n in layer_names if not qcfg.is_skipped(n)]
    if not kept:
        raise ValueError('quant_cfg.skip excludes every quantizable layer')
    first, last = kept[0], kept[-1]
    model.eval()
    if qcfg['fold_bn']:
        fold_bn(model)
    device = next(model.parameters()).device

    def swap_layer(name, with_input_quantizer, kind=None):
        layer = model.get_submodule(name)
        w_bits, a_bits = qcfg.bits_for(name, first, last)
        in_q = factory.act(a_bits, device, kind) if with_input_quantizer else None
        qlayer = quant_twin(layer).from_float(layer, factory.weight(layer, w_bits), in_q)
        _set_submodule(model, name, qlayer)
        return qlayer

    def visit(prefix, module):
        for child_name, child in list(module.named_children()):
            name = prefix + child_name
            rule = next((r for r in rules if r.match(module, child_name, child)), None)
            if rule is not None:
                unit = rule.prepare(module, child_name, child)
                if unit is not child:
                    setattr(module, child_name, unit)
                    child = unit
                every = [n for n, m in child.named_modules() if quant_twin(m) is not None]
                entries = set(rule.entry_layers(child, every))  # skipped layers still read the input
                inner = [n for n in every if not qcfg.is_skipped(f'{name}.{n}')]
                if not inner:
                    continue
                for rel in inner:
                    swap_layer(f'{name}.{rel}', rel not in entries, rule.input_kind(child, rel))
                # the block input is quantized at the activation bits of its first layer
                a_bits = qcfg.bits_for(f'{name}.{every[0]}', first, last)[1]
                in_q = factory.act(a_bits, device) if rule.quantize_input else None
                if in_q is not None:
                    child.add_module('input_quantizer', in_q)
                    child.register_forward_pre_hook(_quantize_block_input)
                # quantizers on tensors that are no layer's input (attention matmul operands)
                rule.attach_quantizers(child, lambda kind, bits=a_bits: factory.act(bits, device, kind))
                setattr(child, UNIT_ATTR, rule.kind)
            elif quant_twin(child) is not None:
                if not qcfg.is_skipped(name):
                    tail = next((t for r in rules for t in [r.layer_tail(module, child_name)] if t), None)
                    qlayer = swap_layer(name, True)
                    setattr(qlayer, UNIT_ATTR, type(child).__name__)
                    if tail:
                        setattr(qlayer, TAIL_ATTR, tuple(tail))
            else:
                visit(name + '.', child)

    visit('', model)
    return model


def find_units(model: nn.Module):
    """The reconstruction units of a swapped model, in module-registration order."""
    units, skip_prefix = [], None
    for name, m in model.named_modules():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        kind = getattr(m, UNIT_ATTR, None)
        if kind is not None:
            units.append(Unit(name, m, kind, _tail_modules(model, name, getattr(m, TAIL_ATTR, ()))))
            skip_prefix = name + '.'
    return units


def _tail_modules(model, name, tail_names):
    parent_name = name.rpartition('.')[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    tail = tuple(getattr(parent, n, None) for n in tail_names)
    missing = [n for n, m in zip(tail_names, tail) if m is None]
    if missing:
        raise ValueError(f'unit {name!r}: its tail modules {missing} are not children of {parent_name!r}')
    return tail


def quantizers_of(module: nn.Module, role=None):
    """All quantizers under ``module`` (optionally only ``'weight'`` or ``'act'`` ones)."""
    return [m for m in module.modules()
            if isinstance(m, UniformQuantizer) and (role is None or getattr(m, 'role', None) == role)]


def set_quant_state(module: nn.Module, weight: bool = True, act: bool = True):
    """Enable/disable weight and activation quantization everywhere under ``module``."""
    for q in quantizers_of(module):
        q.enabled = weight if getattr(q, 'role', 'act') == 'weight' else act
    return module


def unit_layers(unit: Unit):
    """``{relative name: quantized layer}`` of a unit (the unit itself for a layer unit)."""
    if not unit.is_block:
        return {'': unit.module}
    return {n: m for n, m in unit.module.named_modules() if isinstance(m, QuantLayerMixin)}


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches, forward=None):
    """Initialise every activation quantizer's range from calibration batches.

    Quantizers initialise on the first batch that reaches them, in execution order, so
    each one sees inputs already quantized upstream (as at inference).
    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    acts = [q for q in quantizers_of(model, 'act') if q.enabled and not q.initialized]
    for q in acts:
        q.observing = True
    try:
        for batch in batches:
            shard_range_init(acts, batch)  # several processes: ranges from the global batch
            forward(model, batch) if forward is not None else model(batch)
            if all(q.initialized for q in acts):
                break
    finally:
        shard_range_init(acts, None)
        for q in acts:
            q.observing = False
    missing = [n for n, m in model.named_modules() if m in acts and not m.initialized]
    if missing:
        raise RuntimeError(f'activation quantizers never reached by the calibration data: {missing[:5]}')
    fold_post_ln_scales(model)  # post-LayerNorm per-channel scales -> LayerNorm and next Linear
    return model
