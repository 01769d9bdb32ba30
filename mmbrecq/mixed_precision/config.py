"""``quant_cfg.mixed_precision``: the search settings, validated with errors that name the key.

```python
mixed_precision=dict(
    type='GeneticSearcher',                 # a registered searcher (SEARCHERS)
    budget=dict(size_mb=1.2),               # exactly one of size_mb / bops / latency_ms;
                                            # a number, or 'uniform_w3': the cost of uniform
                                            # 3-bit weights (keep_8bit / overrides as set)
    candidates=(2, 4, 8),                   # weight bit widths a searched layer may take
    cost_model=None,                        # default from the budget key (ModelSize, BOPs,
                                            # LatencyTable); any COST_MODELS type
    latency_table=None,                     # .json / .csv table, needed by latency_ms
    sensitivity=dict(iters=0, fisher_weight='raw', fisher_model='full', max_combos=27, act_quant=False),
    population_size=50, generations=200, seed=0, ...   # the searcher's own arguments
)
```
This module only reads the config (no torch), so ``QuantConfig`` can validate it early.
"""
import copy
import inspect
import re

from mmbrecq.quantizers import check_bits
from mmbrecq.registry import COST_MODELS, SEARCHERS

KEY = 'quant_cfg.mixed_precision'
#: budget key -> the cost model that measures it
BUDGET_KEYS = dict(size_mb='ModelSize', bops='BOPs', latency_ms='LatencyTable')
UNIFORM_RE = re.compile(r'^uniform_w(\d+)$')

DEFAULT_SENSITIVITY = dict(
    iters=0,                # 0: nearest rounding; > 0: that many AdaRound steps per candidate
    fisher_weight='raw',    # g^2 (the paper's diagonal Fisher); 'abs_plus_one' | 'normalized'
    max_combos=27,          # every per-layer combination of a unit up to this many, else
                            # exact diagonal + pairwise (second-order) estimates
    act_quant=False,        # quantize the unit's activations while measuring
    fisher_model='full',    # Fisher gradient with the whole model quantized at the uniform w_bits
                            # ('full': one scale for every unit) or only up to the unit
                            # ('prefix', as reconstruction; early units then get tiny weights)
)
DEFAULTS = dict(type='GeneticSearcher', budget=None, candidates=(2, 4, 8), cost_model=None,
                latency_table=None, sensitivity=dict())


def _searcher_args(cls):
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def mp_config(cfg):
    """Merge ``cfg`` over the defaults and check it; returns a plain dict with
    ``searcher`` (the searcher's own keyword arguments) and ``budget_key`` / ``budget_value``.

    Raises:
        ValueError: naming the offending key.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f'{KEY} must be a dict (or None), got {cfg!r}')
    merged = copy.deepcopy(DEFAULTS)
    merged.update(copy.deepcopy(dict(cfg)))
    stype = merged['type']
    cls = SEARCHERS.get(stype) if isinstance(stype, str) else None
    if cls is None:
        raise ValueError(f'{KEY}.type={stype!r} is not a registered searcher; registered: '
                         f'{sorted(SEARCHERS.module_dict)}')
    own = set(DEFAULTS)
    allowed = _searcher_args(cls)
    unknown = sorted(set(merged) - own - allowed)
    if unknown:
        raise ValueError(f'unknown key(s) in {KEY}: {unknown}; valid: {sorted(own | allowed)}')
    merged['searcher'] = {k: merged.pop(k) for k in list(merged) if k in allowed and k not in own}

    budget = merged['budget']
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGET_KEYS:
        raise ValueError(f'{KEY}.budget must be a dict with exactly one of {sorted(BUDGET_KEYS)}, '
                         f'got {budget!r}')
    (bkey, bval), = budget.items()
    if isinstance(bval, str):
        m = UNIFORM_RE.match(bval)
        if not m:
            raise ValueError(f"{KEY}.budget.{bkey}={bval!r}: a number or 'uniform_w<bits>' "
                             "(e.g. 'uniform_w3': the cost of uniform 3-bit weights)")
        check_bits(int(m[1]), f'{KEY}.budget.{bkey} (uniform bits)')
    elif isinstance(bval, bool) or not isinstance(bval, (int, float)) or not bval > 0:
        raise ValueError(f'{KEY}.budget.{bkey} must be a positive number, got {bval!r}')
    merged['budget_key'], merged['budget_value'] = bkey, bval

    cands = merged['candidates']
    if not isinstance(cands, (list, tuple)) or not cands:
        raise ValueError(f'{KEY}.candidates must be a non-empty list of bit widths, got {cands!r}')
    for i, b in enumerate(cands):
        check_bits(b, f'{KEY}.candidates[{i}]')
    if len(set(cands)) != len(cands):
        raise ValueError(f'{KEY}.candidates has duplicates: {list(cands)}')
    merged['candidates'] = tuple(sorted(cands))

    implied = BUDGET_KEYS[bkey]
    cm = merged['cost_model'] or implied
    if COST_MODELS.get(cm) is None:
        raise ValueError(f'{KEY}.cost_model={cm!r} is not a registered cost model; registered: '
                         f'{sorted(COST_MODELS.module_dict)}')
    if cm in BUDGET_KEYS.values() and cm != implied:
        raise ValueError(f'{KEY}.cost_model={cm!r} does not measure budget.{bkey} '
                         f'(that is {implied}); drop cost_model or change the budget key')
    merged['cost_model'] = cm
    if cm == 'LatencyTable' and not merged['latency_table']:
        raise ValueError(f'{KEY}.latency_table: budget.latency_ms needs a latency table file '
                         '(.json / .csv with layer, w_bits, a_bits, latency_ms)')
    if merged['latency_table'] and cm != 'LatencyTable':
        raise ValueError(f'{KEY}.latency_table is only read with budget.latency_ms')

    sens = merged['sensitivity']
    if not isinstance(sens, dict):
        raise ValueError(f'{KEY}.sensitivity must be a dict, got {sens!r}')
    unknown = sorted(set(sens) - set(DEFAULT_SENSITIVITY))
    if unknown:
        raise ValueError(f'unknown key(s) in {KEY}.sensitivity: {unknown}; valid: {sorted(DEFAULT_SENSITIVITY)}')
    sens = dict(DEFAULT_SENSITIVITY, **sens)
    if not isinstance(sens['iters'], int) or isinstance(sens['iters'], bool) or sens['iters'] < 0:
        raise ValueError(f'{KEY}.sensitivity.iters must be an integer >= 0, got {sens["iters"]!r}')
    if sens['fisher_weight'] not in ('raw', 'abs_plus_one', 'normalized'):
        raise ValueError(f"{KEY}.sensitivity.fisher_weight={sens['fisher_weight']!r}: expected 'raw', "
                         "'abs_plus_one' or 'normalized'")
    if sens['fisher_model'] not in ('full', 'prefix'):
        raise ValueError(f"{KEY}.sensitivity.fisher_model={sens['fisher_model']!r}: expected 'full' or 'prefix'")
    if not isinstance(sens['max_combos'], int) or sens['max_combos'] < 1:
        raise ValueError(f'{KEY}.sensitivity.max_combos must be a positive integer, got {sens["max_combos"]!r}')
    merged['sensitivity'] = sens
    try:
        cls(**merged['searcher'])
    except (TypeError, ValueError) as e:
        raise ValueError(f'{KEY}: the {stype} arguments are invalid: {e}') from None
    return merged
