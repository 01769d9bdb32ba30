"""``quant_cfg.mixed_precision`` validation: every error names the key."""
import pytest

import mmbrecq  # noqa: F401
from mmbrecq.config import mp_config
from mmbrecq.modules import QuantConfig


def _mp(**kw):
    return dict(dict(type='GeneticSearcher', budget=dict(size_mb=1.0)), **kw)


def test_defaults_and_searcher_args():
    cfg = mp_config(_mp(population_size=20, seed=3, candidates=[8, 2, 4]))
    assert cfg['candidates'] == (2, 4, 8)
    assert cfg['cost_model'] == 'ModelSize' and cfg['budget_key'] == 'size_mb' and cfg['budget_value'] == 1.0
    assert cfg['searcher'] == dict(population_size=20, seed=3)
    assert cfg['sensitivity'] == dict(iters=0, fisher_weight='raw', max_combos=27, act_quant=False,
                                      fisher_model='full')
    assert mp_config(_mp(budget=dict(bops=1e9)))['cost_model'] == 'BOPs'
    assert mp_config(_mp(budget=dict(size_mb='uniform_w3')))['budget_value'] == 'uniform_w3'
    cfg = mp_config(_mp(budget=dict(latency_ms=2.0), latency_table='t.csv'))
    assert cfg['cost_model'] == 'LatencyTable'
    QuantConfig(dict(mixed_precision=_mp()))  # accepted by quant_cfg


@pytest.mark.parametrize('mp, match', [
    (dict(budget=None), r'mixed_precision\.budget must be a dict with exactly one'),
    (dict(budget=dict()), r'mixed_precision\.budget must be a dict with exactly one'),
    (dict(budget=dict(size_mb=1, bops=2)), r'mixed_precision\.budget must be a dict with exactly one'),
    (dict(budget=dict(size_gb=1)), r'mixed_precision\.budget must be a dict with exactly one'),
    (dict(budget=dict(size_mb=-1)), r'mixed_precision\.budget\.size_mb must be a positive number'),
    (dict(budget=dict(size_mb='w3')), r"mixed_precision\.budget\.size_mb='w3'"),
    (dict(budget=dict(size_mb='uniform_w9')), r'mixed_precision\.budget\.size_mb \(uniform bits\)=9'),
    (dict(population_sise=10), r"unknown key\(s\) in quant_cfg\.mixed_precision: \['population_sise'\]"),
    (dict(type='NoSuchSearcher'), r"mixed_precision\.type='NoSuchSearcher' is not a registered searcher"),
    (dict(candidates=(2, 5, 9)), r'mixed_precision\.candidates\[2\]=9'),
    (dict(candidates=(4, 4)), r'mixed_precision\.candidates has duplicates'),
    (dict(candidates=()), r'mixed_precision\.candidates must be a non-empty list'),
    (dict(cost_model='BOPs'), r"mixed_precision\.cost_model='BOPs' does not measure budget\.size_mb"),
    (dict(cost_model='Nope'), r"mixed_precision\.cost_model='Nope' is not a registered cost model"),
    (dict(budget=dict(latency_ms=1)), r'mixed_precision\.latency_table: budget\.latency_ms needs'),
    (dict(latency_table='t.csv'), r'mixed_precision\.latency_table is only read with budget\.latency_ms'),
    (dict(sensitivity=dict(iter=3)), r"unknown key\(s\) in quant_cfg\.mixed_precision\.sensitivity: \['iter'\]"),
    (dict(sensitivity=dict(iters=-1)), r'mixed_precision\.sensitivity\.iters must be an integer >= 0'),
    (dict(sensitivity=dict(fisher_weight='sq')), r"mixed_precision\.sensitivity\.fisher_weight='sq'"),
    (dict(sensitivity=dict(max_combos=0)), r'mixed_precision\.sensitivity\.max_combos'),
    (dict(sensitivity=dict(fisher_model='half')), r"mixed_precision\.sensitivity\.fisher_model='half'"),
    (dict(population_size=1), r'mixed_precision: the GeneticSearcher arguments are invalid'),
])
def test_bad_config_names_the_key(mp, match):
    with pytest.raises(ValueError, match=match):
        mp_config(_mp(**mp))
    with pytest.raises(ValueError, match=match):  # the same error from quant_cfg
        QuantConfig(dict(mixed_precision=_mp(**mp)))


def test_not_a_dict():
    with pytest.raises(ValueError, match=r'quant_cfg\.mixed_precision must be a dict'):
        QuantConfig(dict(mixed_precision=3))
