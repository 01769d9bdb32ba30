"""Reconstruction units and what is known about them.

* :class:`Unit`: one block (several layers) or a single layer of a swapped model, found
  by :func:`find_units` from the marks that :func:`mmbrecq.modules.quantize_model` left;
* :class:`UnitTrace`: what the probe forward learned about a unit (order, shapes, chaining);
* :class:`UnitData`: a unit's cached inputs, float target and Fisher weights, and the
  batches that the optimisation draws from them.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from mmbrecq.modules import TAIL_ATTR, UNIT_ATTR, QuantLayerMixin
from mmbrecq.quantizers import LSQQuantizer


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

    @property
    def label(self) -> str:
        """The unit kind with its tail, e.g. ``Conv2d+Identity+ReLU+MaxPool2d`` (logs)."""
        return '+'.join([self.kind] + [type(m).__name__ for m in self.tail])

    def forward(self, x):
        x = self.module(x)
        for m in self.tail:
            x = m(x)
        return x


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


def layer_units(model: nn.Module):
    """Every quantized layer as its own unit (layer-wise AdaRound, the BRECQ ablation)."""
    return [Unit(n, m, type(m).__name__) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def _tail_modules(model, name, tail_names):
    parent_name = name.rpartition('.')[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    tail = tuple(getattr(parent, n, None) for n in tail_names)
    missing = [n for n, m in zip(tail_names, tail) if m is None]
    if missing:
        raise ValueError(f'unit {name!r}: its tail modules {missing} are not children of {parent_name!r}')
    return tail


def unit_layers(unit: Unit):
    """``{relative name: quantized layer}`` of a unit (the unit itself for a layer unit)."""
    if not unit.is_block:
        return {'': unit.module}
    return {n: m for n, m in unit.module.named_modules() if isinstance(m, QuantLayerMixin)}


def entry_quantizer(unit):
    """The quantizer of a unit's input (a block's pre-hook quantizer or a layer's own)."""
    q = getattr(unit.module, 'input_quantizer', None)
    return q if isinstance(q, LSQQuantizer) else None


@dataclass
class UnitTrace:
    """What the probe learned about one unit."""
    order: int = -1
    in_shapes: list = field(default_factory=list)   # per call, without the batch dim
    out_shapes: list = field(default_factory=list)
    in_rows: list = field(default_factory=list)     # per call, rows per sample (RoI heads: proposals)
    out_rows: list = field(default_factory=list)
    chained: bool = False                           # input of every call = previous unit's output

    @property
    def calls(self):
        return len(self.in_shapes)


class UnitData:
    """The caches of one unit: per call, inputs (quantized / float), target, Fisher weight."""

    def __init__(self, x_q, x_fp, y_fp, weight):
        self.x_q, self.x_fp, self.y_fp, self.weight = x_q, x_fp, y_fp, weight
        first = (x_q or x_fp)[0]
        self.num_samples = len(first)
        self.index_device = (first.data.device if all(c.where == 'device' for c in self.all()) else
                             torch.device('cpu'))

    @property
    def calls(self):
        return len(self.y_fp)

    def all(self):
        return [c for group in (self.x_q, self.x_fp, self.y_fp, self.weight) if group for c in group]

    def describe(self):
        places = sorted({c.where for c in self.all()})
        mib = sum(c.nbytes for c in self.all()) / 2**20
        return f'{mib:.0f} MiB on {"+".join(places)}'

    def batch(self, k, idx, input_mix, keep_q_prob):
        """One step's batch of call ``k``: ``(x, y, w, from_q)``, valid until the next call
        (buffers are reused). ``from_q``: in ``'qdrop'`` mode, which elements of ``x`` come
        from the quantized stream (the others from the float model), else ``None``."""
        from_q = None
        if input_mix == 'fp':
            x = self.x_fp[k].gather(idx, reuse=True)
        elif input_mix == 'quant':
            x = self.x_q[k].gather(idx, reuse=True)
        else:  # qdrop: element-wise random choice of quantized / float input
            xq, xf = self.x_q[k].gather(idx, reuse=True), self.x_fp[k].gather(idx, reuse=True)
            from_q = torch.rand_like(xq) < keep_q_prob
            x = torch.where(from_q, xq, xf)
        w = self.weight[k].gather(idx, reuse=True) if self.weight else None
        return x, self.y_fp[k].gather(idx, reuse=True), w, from_q
