"""Eager swap of a float model into a quantized one, by block rules.

``quantize_model`` edits the user's own module tree in place: BN folded, Conv2d/Linear
replaced by their quantized twins, activation quantizers placed by the block rules.
Nothing is traced and nothing global is patched, so mmdet heads, RoI code and the
``loss``/``predict``/``tensor`` modes of the model keep working on the same tree.
"""
from torch import nn

from mmbrecq.registry import BLOCK_RULES, QUANTIZERS, build_from

from .bn_fold import fold_bn
from .quant_config import QuantConfig
from .quant_layers import quant_twin

UNIT_ATTR = '_mmbrecq_unit_kind'
TAIL_ATTR = '_mmbrecq_unit_tail'


def _quantize_block_input(block, args):
    """Forward pre-hook: the block's input quantizer, applied once for all its branches."""
    if not args:
        return None
    return (block.input_quantizer(args[0]), ) + tuple(args[1:])


def _build_rules(names):
    if names is None:
        names = list(BLOCK_RULES.module_dict)
    rules = []
    for n in names:
        if n not in BLOCK_RULES.module_dict and BLOCK_RULES.get(n) is None:
            raise ValueError(f'quant_cfg.block_rules: unknown rule {n!r}; registered rules: '
                             f'{sorted(BLOCK_RULES.module_dict)}')
        rules.append(build_from(BLOCK_RULES, dict(type=n)))
    return rules


class _QuantizerFactory:
    """Builds weight/activation quantizers from ``quant_cfg``, with errors naming the key."""

    def __init__(self, qcfg: QuantConfig):
        self.w_cfg = dict(qcfg['weight_quantizer'])
        self.a_cfg = dict(qcfg['act_quantizer'])
        for key, c in (('weight_quantizer', self.w_cfg), ('act_quantizer', self.a_cfg)):
            if QUANTIZERS.get(c['type']) is None:
                raise ValueError(f'quant_cfg.{key}.type={c["type"]!r} is not a registered quantizer; '
                                 f'registered: {sorted(QUANTIZERS.module_dict)}')

    def weight(self, layer, bits):
        cfg = dict(self.w_cfg, bits=bits, num_channels=layer.weight.shape[0], ch_axis=0)
        if QUANTIZERS.get(cfg['type']).__name__ == 'AdaRoundQuantizer':
            cfg['weight_shape'] = tuple(layer.weight.shape)
        q = build_from(QUANTIZERS, dict(cfg, role='weight')).to(layer.weight.device)
        q.init_range(layer.weight)
        return q

    def act(self, bits, device):
        if bits is None:
            return None
        return build_from(QUANTIZERS, dict(self.a_cfg, bits=bits, role='act')).to(device)


def quantize_model(model: nn.Module, quant_cfg) -> nn.Module:
    """Swap ``model`` (in place) into its fake-quantized twin; return it.

    Weight ranges are initialised here (they depend only on the weights); activation
    ranges need data: see :func:`mmbrecq.calibrate_activations`.
    """
    qcfg = quant_cfg if isinstance(quant_cfg, QuantConfig) else QuantConfig(quant_cfg)
    # every check first: a config error must leave the user's model untouched
    rules = _build_rules(qcfg['block_rules'])
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

    def swap_layer(name, with_input_quantizer):
        layer = model.get_submodule(name)
        w_bits, a_bits = qcfg.bits_for(name, first, last)
        in_q = factory.act(a_bits, device) if with_input_quantizer else None
        qlayer = quant_twin(layer).from_float(layer, factory.weight(layer, w_bits), in_q)
        model.set_submodule(name, qlayer)
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
                    swap_layer(f'{name}.{rel}', rel not in entries)
                # the block input is quantized at the activation bits of its first layer
                in_q = factory.act(qcfg.bits_for(f'{name}.{every[0]}', first, last)[1], device)
                if in_q is not None:
                    child.add_module('input_quantizer', in_q)
                    child.register_forward_pre_hook(_quantize_block_input)
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
