"""The mixed-precision stage of a PTQ run: sensitivities → search → bit map → model.

:func:`search_mixed_precision` runs after the activation calibration and before the
reconstruction. It measures (or reads from the cache) every unit's sensitivity, traces
the per-layer parameter / MAC counts of the real model, searches the per-layer weight
bits under the budget with the configured searcher, writes ``mixed_precision.json`` and
``mp_sensitivity.png`` to the work dir, and re-grids the model's weight quantizers (range
searched again at the new widths; activation ranges calibrated again, since the weights
upstream changed). A resumed run reads the bit map back instead of searching.
"""
import json
import os
import os.path as osp
import time

from mmengine.logging import print_log

from mmbrecq.config.quant_cfg import UNIFORM_RE
from mmbrecq.modules import QuantConfig, quantizers_of, set_quant_state
from mmbrecq.reconstruction import calibrate_activations
from mmbrecq.registry import COST_MODELS, SEARCHERS, build_from
from mmbrecq.utils import InputError, atomic_json_dump

from .bits import apply_bit_map
from .cost_models import BOPs, ModelSize
from .layer_stats import trace_layer_stats
from .sensitivity import _key, measure_sensitivity, search_space

MP_FILE = 'mixed_precision.json'
SENS_CACHE_FILE = 'mp_sensitivity_cache.json'
SENS_PLOT_FILE = 'mp_sensitivity.png'
VERSION = 1


def build_cost_model(mp, layer_stats):
    cls = COST_MODELS.get(mp['cost_model'])
    if mp['latency_table']:
        return cls(layer_stats, table=mp['latency_table'])
    return cls(layer_stats)


def _bit_config(spaces, options):
    """``{layer: (w_bits, a_bits)}`` of one option per unit."""
    return {name: (w, a) for sp, opt in zip(spaces, options)
            for name, w, a in zip(sp.layers, opt, sp.a_bits)}


def _uniform_options(spaces, w_bits):
    return [tuple(w_bits if len(a) > 1 else a[0] for a in sp.allowed) for sp in spaces]


def _pareto(options, costs, sens):
    """Indices of the options no other option beats on both cost and sensitivity."""
    order = sorted(range(len(options)), key=lambda j: (costs[j], sens[j]))
    keep, best = [], float('inf')
    for j in order:
        if sens[j] < best:
            keep.append(j)
            best = sens[j]
    return sorted(keep)


def _same_search(saved, mp, spaces):
    cfg = saved.get('config', {})
    now = dict(budget=mp['budget'], candidates=list(mp['candidates']), cost_model=mp['cost_model'])
    was = dict(budget=cfg.get('budget'), candidates=list(cfg.get('candidates', [])),
               cost_model=cfg.get('cost_model'))
    layers = sorted(n for sp in spaces for n in sp.layers)
    return now == was and sorted(saved.get('bit_map', {})) == layers, was, now


def _summary(report, path):
    b = report['budget']
    return dict(bit_map=path, budget={b['key']: b['value']}, budget_spec=b['spec'],
                budget_met=report['budget_met'], size_mb=report['cost']['size_mb'], bops=report['cost']['bops'],
                **({'latency_ms': report['cost']['latency_ms']} if 'latency_ms' in report['cost'] else {}),
                sensitivity_total=report['sensitivity_total'], mean_w_bits=report['mean_w_bits'],
                uniform=report['uniform'], reused=report.get('reused', False))


def search_mixed_precision(model, calib, quant_cfg, work_dir=None, resume=False, logger=None, write=True):
    """Search and apply a per-layer weight bit map (see the module docstring).

    Args:
        model: swapped model, activation ranges calibrated.
        calib: the :class:`CalibrationSet`.
        quant_cfg: ``quant_cfg`` with a ``mixed_precision`` section.
        work_dir: where ``mixed_precision.json``, the sensitivity cache and the plot go.
        resume: reuse ``mixed_precision.json`` from ``work_dir`` if it is there.
        write: write files (rank 0 of a distributed run); every rank searches, rank 0's
            answer is broadcast.

    Returns:
        the summary for ``summary.json`` (budget, met, size MB, BOPs, path of the bit map).

    Raises:
        ValueError: an infeasible budget (with the smallest achievable cost), or a resumed
            work dir whose bit map was searched under another budget / model.
    """
    qcfg = quant_cfg if isinstance(quant_cfg, QuantConfig) else QuantConfig(quant_cfg)
    mp = qcfg['mixed_precision']  # validated and merged by the quant_cfg schema
    if mp is None:
        raise ValueError('search_mixed_precision needs quant_cfg.mixed_precision (a dict), got None')
    t0 = time.perf_counter()
    path = osp.join(work_dir, MP_FILE) if work_dir else None
    spaces = search_space(model, qcfg, mp['candidates'])
    if resume and path and osp.isfile(path):
        report = _reuse(path, mp, spaces, logger)
    else:
        report = _search(model, calib, qcfg, mp, spaces, work_dir, logger, write)
        report['search_seconds'] = time.perf_counter() - t0
        if path and write:
            os.makedirs(work_dir, exist_ok=True)
            atomic_json_dump(report, path, indent=1)
            try:
                from .plot import plot_sensitivity
                plot_sensitivity(report, osp.join(work_dir, SENS_PLOT_FILE))
            except Exception as e:  # a plot must never fail a run
                print_log(f'mixed precision: sensitivity plot failed: {e!r}', logger, level=30)
    report = _broadcast(report)
    changed = apply_bit_map(model, report['bit_map'])
    # activation ranges were calibrated with the uniform weights upstream: calibrate again
    acts = quantizers_of(model, 'act')
    for q in acts:
        q.reset_range()
    set_quant_state(model, True, True)
    if acts:
        calibrate_activations(model, calib.batches[:1], calib.forward, stream=qcfg['calib']['act_stream'])
    print_log(f'mixed precision: {len(changed)} layers re-gridded; {report["budget"]["key"]} '
              f'{report["cost"][report["budget"]["key"]]:.6g} <= {report["budget"]["value"]:.6g} '
              f'({"met" if report["budget_met"] else "NOT met"}), mean weight bits {report["mean_w_bits"]:.3f}',
              logger)
    return _summary(report, path)


def _reuse(path, mp, spaces, logger):
    """The bit map of a resumed run's ``mixed_precision.json``, if it was searched for this config."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        raise InputError(f'resume: {path} is not readable ({e}); delete it to search the bit map again') from e
    same, was, now = _same_search(saved, mp, spaces)
    if not same:
        raise ValueError(f'resume: {path} was searched with {was} (or for other layers), the config now '
                         f'asks for {now}; resume in a new work dir, or run without --resume')
    print_log(f'mixed precision: resume reuses the bit map of {path} (no new search)', logger)
    return dict(saved, reused=True)


def _broadcast(report):
    from mmengine.dist import broadcast_object_list, get_world_size
    if get_world_size() > 1:
        box = [report]
        broadcast_object_list(box, src=0)
        report = box[0]
    return report


def _search(model, calib, qcfg, mp, spaces, work_dir, logger, write):
    bkey, bval = mp['budget_key'], mp['budget_value']
    stats = trace_layer_stats(model, calib.forward, calib.batches[0])
    cost_model = build_cost_model(mp, stats)
    by_name = {s.name: s for s in stats}
    size_model, bops_model = ModelSize(stats), BOPs(stats)

    def costs_of(options):
        cfg = _bit_config(spaces, options)
        out = dict(size_mb=size_model(cfg), bops=bops_model(cfg))
        out[bkey] = cost_model(cfg)
        return out

    uniform = {str(b): costs_of(_uniform_options(spaces, b)) for b in sorted(set(mp['candidates']) | {2, 3, 4, 8})}
    m = UNIFORM_RE.match(bval) if isinstance(bval, str) else None
    budget = costs_of(_uniform_options(spaces, int(m[1])))[bkey] if m else float(bval)
    budget_desc = f'quant_cfg.mixed_precision.budget.{bkey}={bval!r}' + (f' (= {budget:.6g})' if m else '')

    # per-layer cost of an option, for the Pareto filter and the infeasibility check
    def group_cost(sp, opt):
        return sum(cost_model.layer_cost(by_name[n], w, a or 32) for n, w, a in zip(sp.layers, opt, sp.a_bits))

    cheapest = [min(sp.options, key=lambda o: group_cost(sp, o)) for sp in spaces]
    min_cost = cost_model(_bit_config(spaces, cheapest))
    if min_cost > budget:
        raise ValueError(f'{budget_desc} is infeasible: the smallest achievable {bkey} is {min_cost:.6g} '
                         f'(every searched layer at {min(mp["candidates"])} bits, keep_8bit / overrides '
                         'layers fixed); raise the budget or add a lower candidate')

    sens_cfg = mp['sensitivity']
    sens = measure_sensitivity(
        model, calib, spaces, qcfg['recon'], iters=sens_cfg['iters'], fisher_weight=sens_cfg['fisher_weight'],
        max_combos=sens_cfg['max_combos'], act_quant=sens_cfg['act_quant'], fisher_model=sens_cfg['fisher_model'],
        cache_path=osp.join(work_dir, SENS_CACHE_FILE) if work_dir else None, write_cache=write, logger=logger,
        seed=mp['searcher'].get('seed', 0))
    table = sens['table']

    kept = [_pareto_options(sp, table[sp.name], group_cost) for sp in spaces]
    candidates = [list(range(len(k))) for k in kept]
    sensitivity = [[table[sp.name][o] for o in k] for sp, k in zip(spaces, kept)]

    def cost_fn(choice):
        return cost_model(_bit_config(spaces, [kept[i][j] for i, j in enumerate(choice)]))

    searcher = build_from(SEARCHERS, dict(type=mp['type'], **mp['searcher']))
    fixed = {i: 0 for i, k in enumerate(kept) if len(k) == 1}
    t0 = time.perf_counter()
    try:
        result = searcher.search(candidates, sensitivity, cost_fn, budget, fixed)
    except ValueError as e:
        raise ValueError(f'{budget_desc}: {e}') from None
    chosen = [kept[i][j] for i, j in enumerate(result.choice)]
    final = costs_of(chosen)
    report = _report(mp, spaces, chosen, kept, sens, result, final, uniform, budget, by_name,
                     time.perf_counter() - t0)
    searched = report['search']['searched_layers']
    print_log(f'mixed precision: searched {searched} layers in {len(spaces)} units; sensitivity '
              f'{result.sensitivity:.6g}, {bkey} {final[bkey]:.6g} <= {budget:.6g}; uniform '
              + ', '.join(f'W{b}: {c[bkey]:.4g}' for b, c in uniform.items()), logger)
    return report


def _report(mp, spaces, chosen, kept, sens, result, final, uniform, budget, by_name, search_seconds):
    """The ``mixed_precision.json`` content of a finished search (``chosen``: option per unit)."""
    bkey, bval, table = mp['budget_key'], mp['budget_value'], sens['table']
    bit_cfg = _bit_config(spaces, chosen)
    params = sum(by_name[n].params for n in bit_cfg)
    searched = [n for sp in spaces for n, a in zip(sp.layers, sp.allowed) if len(a) > 1]
    return dict(
        version=VERSION,
        config=dict(budget={bkey: bval}, candidates=list(mp['candidates']), cost_model=mp['cost_model'],
                    type=mp['type'], searcher=mp['searcher'], sensitivity=mp['sensitivity']),
        budget=dict(key=bkey, value=budget, spec=bval),
        cost=final, budget_met=bool(final[bkey] <= budget * (1 + 1e-9)),
        sensitivity_total=result.sensitivity,
        mean_w_bits=sum(by_name[n].params * w for n, (w, _) in bit_cfg.items()) / max(1, params),
        mean_w_bits_searched=(sum(by_name[n].params * bit_cfg[n][0] for n in searched)
                              / max(1, sum(by_name[n].params for n in searched))),
        uniform=uniform,
        bit_map={n: w for n, (w, _) in bit_cfg.items()},
        layers={n: dict(w_bits=w, a_bits=a, params=by_name[n].params, macs=by_name[n].macs)
                for n, (w, a) in bit_cfg.items()},
        units=[dict(name=sp.name, layers=sp.layers, bits=list(opt), searched=bool(sp.free),
                    sensitivity=table[sp.name][opt], estimated=opt in set(map(tuple, sens['estimated'][sp.name])),
                    options=len(sp.options), pareto_options=len(k),
                    diagonal={str(b): _key(tuple(b if len(a) > 1 else a[0] for a in sp.allowed))
                              for b in mp['candidates']} if sp.free else {})
               for sp, opt, k in zip(spaces, chosen, kept)],
        sensitivity={sp.name: {_key(o): v for o, v in table[sp.name].items()} for sp in spaces},
        sensitivity_stats=dict(measured=sens['measured'], cached=sens['cached'], seconds=sens['seconds'],
                               fingerprint=sens['fingerprint']),
        search=dict(seconds=search_seconds, generations=len(result.history),
                    searched_layers=len(searched)),
    )


def _pareto_options(space, values, group_cost):
    """The unit's options on the cost / sensitivity Pareto front (what the search chooses from)."""
    opts = space.options
    idx = _pareto(opts, [group_cost(space, o) for o in opts], [values[o] for o in opts])
    return [opts[j] for j in idx]
