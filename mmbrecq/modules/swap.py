"""Eager swap of a float model into a quantized one, by block rules.

``quantize_model`` edits the user's own module tree in place: BN folded, Conv2d/Linear
replaced by their quantized twins, activation quantizers placed by the block rules.
Nothing is traced and nothing global is patched, so mmdet heads, RoI code and the
``loss``/``predict``/``tensor`` modes of the model keep working on the same tree.
"""
from torch import nn

from mmbrecq.registry import BLOCK_RULES, QUANTIZERS, build_from

from .bn_fold import fold_bn
from .coverage import warn_uncovered_blocks
from .marks import TAIL_ATTR, UNIT_ATTR
from .quant_config import QuantConfig
from .quant_layers import quant_twin


def _quantize_block_input(block, args):
    """Forward pre-hook: the block's input quantizer, applied once for all its branches."""
    if not args:
        return None
    return (block.input_quantizer(args[0]), ) + tuple(args[1:])


def _build_rules(names, qcfg):
    """The block rules to apply (names checked by the quant_cfg schema; ``None``: all); rules
    with options (``quant_cfg.transformer``) read them from ``rule.qcfg``."""
    rules = [build_from(BLOCK_RULES, dict(type=n)) for n in (names if names is not None else BLOCK_RULES.module_dict)]
    for rule in rules:
        rule.qcfg = qcfg
    return rules


class _QuantizerFactory:
    """Builds weight/activation quantizers from ``quant_cfg``."""

    def __init__(self, qcfg: QuantConfig):
        self.w_cfg = dict(qcfg['weight_quantizer'])   # types checked by the quant_cfg schema
        self.a_cfg = dict(qcfg['act_quantizer'])
        self.kind_cfgs = qcfg.kind_quantizers()       # per tensor kind (None: act_quantizer)

    def weight(self, layer, bits):
        cfg = dict(self.w_cfg, bits=bits, num_channels=layer.weight.shape[0], ch_axis=0)
        if QUANTIZERS.get(cfg['type']).__name__ == 'AdaRoundQuantizer':
            cfg['weight_shape'] = tuple(layer.weight.shape)
        q = build_from(QUANTIZERS, dict(cfg, role='weight')).to(layer.weight.device)
        q.init_range(layer.weight)
        return q

    def act(self, bits, device, kind=None):
        """An activation quantizer at ``bits`` (``None``: float) for a tensor of ``kind``."""
        if bits is None:
            return None
        return build_from(QUANTIZERS, dict(self.kind_cfgs.get(kind, self.a_cfg), bits=bits, role='act')).to(device)


class _Swapper:
    """One swap of a model: the rules, the quantizer factory and the per-layer bits."""

    def __init__(self, model, qcfg: QuantConfig, rules, factory, layer_names):
        self.model, self.qcfg, self.rules, self.factory = model, qcfg, rules, factory
        # the first and last layers, and the one that reads the first one's output
        self.ends = (layer_names[0], layer_names[-1], layer_names[1] if len(layer_names) > 1 else None)
        self.device = next(model.parameters()).device

    def swap_layer(self, name, with_input_quantizer, kind=None):
        layer = self.model.get_submodule(name)
        w_bits, a_bits = self.qcfg.bits_for(name, *self.ends)
        in_q = self.factory.act(a_bits, self.device, kind) if with_input_quantizer else None
        qlayer = quant_twin(layer).from_float(layer, self.factory.weight(layer, w_bits), in_q)
        self.model.set_submodule(name, qlayer)
        return qlayer

    def swap_block(self, rule, parent, child_name, name):
        """``parent.<child_name>`` as one unit of ``rule``: inner layers swapped, one input
        quantizer for the whole block (a pre-hook) unless the rule quantizes each layer's
        input itself, and the rule's quantizers on tensors that are no layer's input."""
        child = parent.get_submodule(child_name)
        unit = rule.prepare(parent, child_name, child)
        if unit is not child:
            setattr(parent, child_name, unit)
        every = [n for n, m in unit.named_modules() if quant_twin(m) is not None]
        entries = set(rule.entry_layers(unit, every))  # skipped layers still read the input
        inner = [n for n in every if not self.qcfg.is_skipped(f'{name}.{n}')]
        if not inner:
            return
        for rel in inner:
            self.swap_layer(f'{name}.{rel}', rel not in entries, rule.input_kind(unit, rel))
        # the block input is quantized at the activation bits of its first layer
        a_bits = self.qcfg.bits_for(f'{name}.{every[0]}', *self.ends)[1]
        in_q = self.factory.act(a_bits, self.device) if rule.quantize_input else None
        if in_q is not None:
            unit.add_module('input_quantizer', in_q)
            unit.register_forward_pre_hook(_quantize_block_input)
        # quantizers on tensors that are no layer's input (attention matmul operands)
        rule.attach_quantizers(unit, lambda kind: self.factory.act(a_bits, self.device, kind))
        setattr(unit, UNIT_ATTR, rule.kind)

    def swap_single(self, parent, child_name, name):
        """A layer outside every block: its own unit, with the tail a rule names after it."""
        if self.qcfg.is_skipped(name):
            return
        tail = next((t for r in self.rules for t in [r.layer_tail(parent, child_name)] if t), None)
        kind = type(parent.get_submodule(child_name)).__name__
        qlayer = self.swap_layer(name, True)
        setattr(qlayer, UNIT_ATTR, kind)
        if tail:
            setattr(qlayer, TAIL_ATTR, tuple(tail))

    def visit(self, prefix, module):
        for child_name, child in list(module.named_children()):
            name = prefix + child_name
            rule = next((r for r in self.rules if r.match(module, child_name, child)), None)
            if rule is not None:
                self.swap_block(rule, module, child_name, name)
            elif quant_twin(child) is not None:
                self.swap_single(module, child_name, name)
            else:
                self.visit(name + '.', child)


def quantizable_layers(model: nn.Module):
    """Names of the layers ``quantize_model`` would swap (``quant_cfg`` patterns match these)."""
    return [n for n, m in model.named_modules() if quant_twin(m) is not None]


def quantize_model(model: nn.Module, quant_cfg) -> nn.Module:
    """Swap ``model`` (in place) into its fake-quantized twin; return it.

    Weight ranges are initialised here (they depend only on the weights); activation
    ranges need data: see :func:`mmbrecq.calibrate_activations`.
    """
    qcfg = quant_cfg if isinstance(quant_cfg, QuantConfig) else QuantConfig(quant_cfg)
    # every check first: a config error must leave the user's model untouched
    rules = _build_rules(qcfg['block_rules'], qcfg)
    factory = _QuantizerFactory(qcfg)
    layer_names = quantizable_layers(model)
    if not layer_names:
        raise ValueError(f'{type(model).__name__} has no Conv2d/Linear layer to quantize')
    qcfg.check_patterns(layer_names)
    kept = [n for n in layer_names if not qcfg.is_skipped(n)]
    if not kept:
        raise ValueError('quant_cfg.skip excludes every quantizable layer')
    model.eval()
    if qcfg['fold_bn']:
        fold_bn(model)
    _Swapper(model, qcfg, rules, factory, kept).visit('', model)
    warn_uncovered_blocks(model)  # no silent fallback to layer-wise units
    return model
