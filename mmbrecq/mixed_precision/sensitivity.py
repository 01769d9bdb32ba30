"""Per-unit sensitivity to the weight bit widths of its layers (BRECQ, sec. 3.4).

The sensitivity of a unit at a bit setting is the paper's diagonal (block) term of the
Fisher-weighted loss: the unit alone is quantized (weights at the setting, by default
activations float), it runs on its *float* input, and the squared error of its output
against the float output is weighted by the diagonal Fisher of that output:

    s(unit, bits) = 1/N * sum_samples sum_elements  F * (z_q - z_fp)^2

with ``F = g^2`` by default (``sensitivity.fisher_weight='raw'``), ``g`` the gradient of
KL(float || quantized logits) w.r.t. the unit's output, taken with the whole model
quantized at the configured uniform bits (``fisher_model='full'``; reconstruction takes
it with the model quantized only up to the unit, which makes the gradient, and so the
weights, of early units far smaller: ``'prefix'``). The block-diagonal approximation
makes these terms additive over units, which is what the genetic search minimises.

Inside a unit the layers' bits interact (the paper's intra-block terms), so a unit's
options are *per-layer* bit combinations, e.g. 27 for a BasicBlock with a downsample
conv and candidates {2, 4, 8}. Up to ``max_combos`` combinations (or while the expansion
below would not measure fewer) every one is measured; beyond, the unit's error is
expanded to second order: measured with no searched layer quantized, with each single
layer, and with each pair of layers quantized (the others at 16 bits, i.e. practically
float), then ``s(b) ~ e0 + sum_l (e_l - e0) + sum_{l<m} (e_lm -
e_l - e_m + e0)``; the "diagonal" settings (every searched layer at the same bits) are
always measured exactly. Layers fixed by ``keep_8bit`` / ``overrides`` keep their bits.

Capture and Fisher weights are the reconstruction's own
(:class:`mmbrecq.reconstruction.UnitTargets`). Values are cached in a JSON file keyed by a
fingerprint of the model (weights, grids, activation ranges), the calibration data and
the measurement settings, then by unit and bit setting: a second call (a rerun of the
search, a resumed run) measures nothing it already has.
"""
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log

from mmbrecq.modules import QuantConfig, QuantLayerMixin, quantizers_of, set_quant_state
from mmbrecq.reconstruction import (
    BlockReconstructor,
    CacheBudget,
    UnitData,
    UnitTargets,
    build_task_loss,
    find_units,
    optimise_unit,
    probe_units,
    unit_layers,
)

from .bits import set_weight_bits

#: weight bits standing in for "not quantized" in partial settings (pairwise expansion)
FLOAT_STANDIN_BITS = 16
CACHE_VERSION = 1


@dataclasses.dataclass
class UnitSpace:
    """The searchable bits of one unit.

    Attributes:
        name: unit name (``find_units``).
        layers: full names of its quantized layers, in ``unit_layers`` order.
        allowed: per layer, the weight bits it may take (one value for a fixed layer).
        a_bits: per layer, its input activation bits (``None``: float), for the cost.
    """

    name: str
    layers: List[str]
    allowed: List[Tuple[int, ...]]
    a_bits: List[Optional[int]]

    @property
    def options(self) -> List[Tuple[int, ...]]:
        """Every per-layer combination (the group's options in the search)."""
        return list(itertools.product(*self.allowed))

    @property
    def free(self) -> List[int]:
        return [i for i, a in enumerate(self.allowed) if len(a) > 1]


def search_space(model, quant_cfg, candidates: Sequence[int]) -> List[UnitSpace]:
    """One :class:`UnitSpace` per reconstruction unit of a swapped model.

    A layer matched by ``keep_8bit`` or by an ``overrides`` entry that sets ``w_bits`` is
    fixed at the bits ``quant_cfg`` gives it; every other layer may take any candidate.
    """
    qcfg = quant_cfg if isinstance(quant_cfg, QuantConfig) else QuantConfig(quant_cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]
    if not names:
        raise ValueError('the model has no quantized layer: pass it through quantize_model first')
    first, last, after_first = names[0], names[-1], names[1] if len(names) > 1 else None

    spaces = []
    for unit in find_units(model):
        layers = [f'{unit.name}.{rel}' if rel else unit.name for rel in unit_layers(unit)]
        allowed, a_bits = [], []
        for n in layers:
            w, a = qcfg.bits_for(n, first, last, after_first)
            allowed.append((w, ) if qcfg.fixes_w_bits(n, first, last) else tuple(candidates))
            a_bits.append(a)
        spaces.append(UnitSpace(unit.name, layers, allowed, a_bits))
    return spaces


def _key(bits) -> str:
    return ','.join(str(b) for b in bits)


def measured_settings(space: UnitSpace, max_combos: int) -> Tuple[List[tuple], bool]:
    """The bit settings to measure for a unit, and whether they are all its options.

    Every option up to ``max_combos`` options, or when the second-order expansion would
    not measure fewer (it pays from four searched layers with three candidates: 70
    settings instead of 81); else :func:`expansion_settings`.
    """
    options = space.options
    if len(options) <= max_combos:
        return options, True
    settings = expansion_settings(space)
    return (settings, False) if len(settings) < len(options) else (options, True)


def expansion_settings(space: UnitSpace) -> List[tuple]:
    """Settings of the second-order expansion: the base (searched layers at 16 bits), each
    searched layer alone and each pair at each candidate, plus the diagonal settings."""
    free = space.free
    base = [FLOAT_STANDIN_BITS if i in free else a[0] for i, a in enumerate(space.allowed)]
    out = {tuple(base)}
    for i in free:
        for b in space.allowed[i]:
            out.add(tuple(b if k == i else v for k, v in enumerate(base)))
    for i, j in itertools.combinations(free, 2):
        for bi in space.allowed[i]:
            for bj in space.allowed[j]:
                out.add(tuple(bi if k == i else bj if k == j else v for k, v in enumerate(base)))
    common = set.intersection(*(set(space.allowed[i]) for i in free))
    for b in sorted(common):
        out.add(tuple(b if i in free else v for i, v in enumerate(base)))
    return sorted(out)


def expand(space: UnitSpace, measured: Dict[str, float], exact: bool) -> Tuple[Dict[tuple, float], set]:
    """Sensitivity of every option from the measured settings; returns the table and the
    set of options that are second-order estimates."""
    if exact:
        return {o: measured[_key(o)] for o in space.options}, set()
    free = space.free
    base = [FLOAT_STANDIN_BITS if i in free else a[0] for i, a in enumerate(space.allowed)]

    def e(assign):
        return measured[_key(tuple(assign.get(k, v) for k, v in enumerate(base)))]

    e0 = e({})
    table, estimated = {}, set()
    for o in space.options:
        if _key(o) in measured:
            table[o] = measured[_key(o)]
            continue
        single = {i: e({i: o[i]}) for i in free}
        s = e0 + sum(v - e0 for v in single.values())
        for i, j in itertools.combinations(free, 2):
            s += e({i: o[i], j: o[j]}) - single[i] - single[j] + e0
        table[o] = max(s, 0.0)
        estimated.add(o)
    return table, estimated


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------
def _digest_update(h, t):
    h.update(str(tuple(t.shape)).encode())
    h.update(t.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())


def fingerprint(model, calib, settings: dict) -> str:
    """What the measured values depend on: the float weights, the grids and activation
    ranges the Fisher is taken with, the calibration data and the settings."""
    h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            h.update(f'{name}:{m.weight_quantizer.bits}'.encode())
            _digest_update(h, m.weight)
    for q in quantizers_of(model, 'act'):
        h.update(f'{q.bits}:{q.initialized}'.encode())
        _digest_update(h, q.scale)
    h.update(f'n={calib.num_samples}'.encode())
    for b in (calib.batches[0], calib.batches[-1]):
        x = b['inputs'] if isinstance(b, dict) else b
        if isinstance(x, torch.Tensor):
            _digest_update(h, x)
    return h.hexdigest()[:16]


class SensitivityCache:
    """``{fingerprint: {unit: {bits: value}}}`` in a JSON file, written after every unit."""

    def __init__(self, path: Optional[str], write: bool = True):
        self.path, self.write = path, write
        self.data = {}
        if path and osp.isfile(path):
            try:
                with open(path) as f:
                    data = json.load(f)
            except ValueError:  # unreadable cache (a kill mid-write before writes were atomic): measure again
                data = {}
            if isinstance(data, dict) and data.get('version') == CACHE_VERSION:
                self.data = data.get('entries', {})

    def get(self, fp, unit):
        return dict(self.data.get(fp, {}).get(unit, {}))

    def put(self, fp, unit, values: dict):
        self.data.setdefault(fp, {}).setdefault(unit, {}).update(values)
        if self.path and self.write:
            os.makedirs(osp.dirname(osp.abspath(self.path)), exist_ok=True)
            tmp = self.path + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(dict(version=CACHE_VERSION, entries=self.data), f, indent=1)
            os.replace(tmp, self.path)


@torch.no_grad()
def unit_error(unit, x_fp, y_fp, weights, calib) -> float:
    """Fisher-weighted squared error of the unit's output, summed over elements and calls,
    averaged over samples (the unit's quantizers as they are set)."""
    total = 0.0
    for k in range(len(y_fp)):
        for s, e in calib.chunks():
            err = unit.forward(x_fp[k].read(s, e)) - y_fp[k].read(s, e)
            sq = err.pow(2)
            if weights is not None:
                sq = sq * weights[k].read(s, e)
            total += float(sq.sum(dtype=torch.float64))
    return total / calib.num_samples


def _set_unit_bits(layers, bits, ranges):
    for layer, b in zip(layers, bits):
        set_weight_bits(layer, b, ranges)
        layer.weight_quantizer.enabled = True


def measure_sensitivity(model, calib, spaces: List[UnitSpace], recon_cfg=None, iters=0,
                        fisher_weight='raw', max_combos=27, act_quant=False, fisher_model='full',
                        cache_path=None, write_cache=True, logger=None, seed=0):
    """Measure the sensitivities of every unit of ``spaces`` (see the module docstring).

    Args:
        model: the swapped model, activation ranges calibrated (left as it was found:
            grids, rounding, quantization state).
        calib: the :class:`CalibrationSet`.
        spaces: from :func:`search_space`.
        recon_cfg: ``quant_cfg.recon`` (capture cache budget, task loss, and with
            ``iters > 0`` the AdaRound settings).
        iters: 0: nearest rounding; > 0: AdaRound steps per setting before measuring.
        fisher_model: ``'full'``: the Fisher gradient is taken with every unit quantized (at
            the model's current bits), so all units share one scale; ``'prefix'``: quantized
            up to the unit, as reconstruction does (the KL gradient then shrinks towards
            the input, and early units look insensitive).
        cache_path: JSON cache (``None``: no cache).

    Returns:
        ``dict(table={unit: {bits tuple: value}}, estimated={unit: [bits tuples]},
        measured=<settings measured now>, cached=<settings read from the cache>, seconds)``.
    """
    t0 = time.perf_counter()
    rcfg = dict(recon_cfg or {})
    rcfg.update(granularity='block', loss='fisher_diag', fisher_weight=fisher_weight, progress=False,
                input_mix='fp', act_mode='joint')
    if iters > 0:
        rcfg['iters'] = iters
    rec = BlockReconstructor(**rcfg)
    if fisher_model not in ('full', 'prefix'):
        raise ValueError(f"fisher_model={fisher_model!r}: expected 'full' or 'prefix'")
    settings = dict(version=CACHE_VERSION, fisher_weight=fisher_weight, iters=iters, act_quant=act_quant,
                    fisher_model=fisher_model, task_loss=rec.cfg['task_loss'])
    if iters > 0:
        settings.update({k: rec.cfg[k] for k in ('batch_size', 'lam', 'b_range', 'warmup', 'weight_lr',
                                                 'act_lr')}, seed=seed)
    fp = fingerprint(model, calib, settings)
    cache = SensitivityCache(cache_path, write_cache)
    plan = {}
    for sp in spaces:
        todo, exact = measured_settings(sp, max_combos)
        have = cache.get(fp, sp.name)
        plan[sp.name] = (todo, exact, have, [s for s in todo if _key(s) not in have])
    n_new = sum(len(p[3]) for p in plan.values())
    n_cached = sum(len(p[0]) - len(p[3]) for p in plan.values())
    print_log(f'mixed precision: sensitivity of {len(spaces)} units, {n_new + n_cached} bit settings '
              f'({n_cached} cached in {cache_path}), fingerprint {fp}', logger)
    if n_new:
        _measure_missing(model, calib, spaces, plan, rec, iters, act_quant, fisher_model, cache, fp, logger,
                         seed)
    table, estimated = {}, {}
    for sp in spaces:
        measured = cache.get(fp, sp.name)
        todo, exact, _, _ = plan[sp.name]
        table[sp.name], est = expand(sp, measured, exact)
        estimated[sp.name] = sorted(est)
    return dict(table=table, estimated=estimated, measured=n_new, cached=n_cached, fingerprint=fp,
                seconds=time.perf_counter() - t0)


def _measure_missing(model, calib, spaces, plan, rec, iters, act_quant, fisher_model, cache, fp, logger, seed):
    device = next(model.parameters()).device
    units, traces = probe_units(model, rec.units_of(model), calib)
    budget = CacheBudget(device, **rec.cfg['cache'])
    targets = UnitTargets(model, calib, budget, build_task_loss(rec.cfg['task_loss'], calib), rec.cfg['fisher_weight'])
    all_layers = [m for m in model.modules() if isinstance(m, QuantLayerMixin)]
    start_bits = {m: m.weight_quantizer.bits for m in all_layers}
    quant_params = {id(p) for q in quantizers_of(model) for p in q.parameters()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        if id(p) not in quant_params:
            p.requires_grad_(False)
    ranges = {}
    try:
        targets.compute_float_outputs()
        for i, unit in enumerate(units):
            todo = plan[unit.name][3] if unit.name in plan else []
            if not todo:
                continue
            layers = list(unit_layers(unit).values())
            t0 = time.perf_counter()
            quantized = [u for u in units if u is not unit] if fisher_model == 'full' else units[:i]
            x_fp, y_fp = targets.float_io(unit, traces[unit.name])
            weights = targets.fisher(unit, traces[unit.name], quantized + [unit])
            snapshot = copy.deepcopy(unit.module.state_dict())
            acts = quantizers_of(unit.module, 'act')
            act_ranges = [(q.scale.detach().clone(), q.zero_point.clone()) for q in acts]
            set_quant_state(model, False, False)
            values = {}
            try:
                for bits in todo:
                    _set_unit_bits(layers, bits, ranges)
                    for q, r in zip(acts, act_ranges):
                        q.load_qparams(*r)
                    if iters > 0:
                        data = UnitData(None, x_fp, y_fp, weights)
                        optimise_unit(unit, data, rec.cfg, seed + i)
                    for q in acts:
                        q.enabled = act_quant
                    values[_key(bits)] = unit_error(unit, x_fp, y_fp, weights, calib)
            finally:
                for layer in layers:
                    set_weight_bits(layer, start_bits[layer], ranges)
                unit.module.load_state_dict(snapshot)
                for c in x_fp + y_fp + (weights or []):
                    c.free()
            cache.put(fp, unit.name, values)
            diag = {k: v for k, v in values.items() if len(set(k.split(','))) == 1}
            print_log(f'mixed precision: [{i + 1}/{len(units)}] {unit.name}: {len(values)} settings in '
                      f'{time.perf_counter() - t0:.1f}s' + (f', e.g. {diag}' if diag else ''), logger)
    finally:
        budget.free_all()
        for m in all_layers:  # layers of units never visited (cached) were not touched
            if m.weight_quantizer.bits != start_bits[m]:
                set_weight_bits(m, start_bits[m], ranges)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        set_quant_state(model, True, True)
