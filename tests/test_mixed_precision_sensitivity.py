"""Per-unit sensitivities on the real digits demo model: ordering in bits, the search
space (keep_8bit / overrides), the second-order estimate beyond ``max_combos``, the cache,
and that measuring leaves the model as it found it."""
import pytest
import torch

import mmbrecq.mixed_precision.sensitivity as sensitivity
from mmbrecq.mixed_precision import search_space, weight_bits_of
from mmbrecq.mixed_precision.sensitivity import expand, expansion_settings, measured_settings

from _mixed_precision import logits, quantized_digits

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
    model, qcfg, calib = quantized_digits()
    spaces = search_space(model, qcfg, (2, 4, 8))
    before = (weight_bits_of(model), logits(model, calib))
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    path = tmp_path_factory.mktemp('sens') / 'cache.json'
    out = sensitivity.measure_sensitivity(model, calib, spaces, cache_path=str(path))
    return dict(model=model, qcfg=qcfg, calib=calib, spaces=spaces, out=out, path=path, before=before,
                requires_grad=requires_grad)


def test_search_space_of_the_digits_model(measured):
    spaces = {sp.name: sp for sp in measured['spaces']}
    assert list(spaces)[0] == 'backbone.conv1' and list(spaces)[-1] == 'head.fc'
    assert spaces['backbone.conv1'].allowed == [(8, )] and spaces['head.fc'].allowed == [(8, )]  # keep_8bit
    blocks = [sp for sp in spaces.values() if sp.name not in ('backbone.conv1', 'head.fc')]
    assert len(blocks) == 8
    for sp in blocks:  # BasicBlock: conv1, conv2 (+ downsample conv): 9 or 27 combinations
        assert all(a == (2, 4, 8) for a in sp.allowed)
        assert len(sp.options) == 3 ** len(sp.layers) and len(sp.layers) in (2, 3)
    assert sum(len(sp.layers) == 3 for sp in blocks) == 3


def test_overrides_fix_layers():
    model, qcfg, _ = quantized_digits(overrides=[dict(pattern='backbone.layer4.*', w_bits=4)])
    spaces = {sp.name: sp for sp in search_space(model, qcfg, (2, 4, 8))}
    assert spaces['backbone.layer4.1'].allowed == [(4, ), (4, )] and spaces['backbone.layer4.1'].free == []
    assert spaces['backbone.layer3.1'].allowed == [(2, 4, 8), (2, 4, 8)]


def test_sensitivity_falls_with_bits(measured):
    """On the real model: every searched unit's error at 8 bits is far below its 2-bit
    error, and 4 bits sits in between."""
    table = measured['out']['table']
    for sp in measured['spaces']:
        if not sp.free:
            continue
        diag = {b: table[sp.name][tuple([b] * len(sp.layers))] for b in (2, 4, 8)}
        assert 0 <= diag[8] < diag[4] < diag[2], (sp.name, diag)
        assert diag[8] < 0.05 * diag[2], (sp.name, diag)
        # one layer raised from 2 to 8 bits: "monotone-ish" only, the layers' errors can
        # partly cancel (on layer2.0, conv2 at 8 bits adds 1 %), hence the intra-block combos
        raised = [table[sp.name][tuple(8 if k == i else 2 for k in range(len(sp.layers)))]
                  for i in range(len(sp.layers))]
        assert min(raised) < diag[2] and max(raised) < 1.1 * diag[2], (sp.name, raised, diag[2])


def test_measuring_leaves_the_model_unchanged(measured):
    bits, out = measured['before']
    model, calib = measured['model'], measured['calib']
    assert weight_bits_of(model) == bits
    assert torch.equal(logits(model, calib), out)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == measured['requires_grad']


def test_cache_is_reused(measured, monkeypatch):
    """A second measurement of the same model (a rerun, a resumed run) computes nothing."""
    calls = []
    real = sensitivity.unit_error
    monkeypatch.setattr(sensitivity, 'unit_error', lambda *a, **k: calls.append(1) or real(*a, **k))
    model, qcfg, calib = quantized_digits()  # a fresh, identical model
    spaces = search_space(model, qcfg, (2, 4, 8))
    again = sensitivity.measure_sensitivity(model, calib, spaces, cache_path=str(measured['path']))
    assert calls == [] and again['measured'] == 0 and again['cached'] == measured['out']['measured']
    assert again['table'] == measured['out']['table']
    # other settings are other cache entries: measured again
    other = sensitivity.measure_sensitivity(model, calib, spaces[:3], cache_path=str(measured['path']),
                                            fisher_weight='abs_plus_one')
    assert other['measured'] == len(calls) == 1 + 9 + 9


def test_second_order_estimate(measured, monkeypatch):
    """The pairwise expansion (base, singles, pairs, diagonal measured; the rest estimated)
    ranks a real block's 27 combinations like the exact measurement. On a 3-layer block it
    would measure more settings than exist, so ``measured_settings`` keeps the exact way."""
    model, calib = measured['model'], measured['calib']
    sp = next(s for s in measured['spaces'] if len(s.layers) == 3)
    assert measured_settings(sp, max_combos=9) == (sp.options, True)
    settings = expansion_settings(sp)
    assert len(settings) == 1 + 9 + 27 + 3
    monkeypatch.setattr(sensitivity, 'measured_settings', lambda space, m: (settings, False))
    out = sensitivity.measure_sensitivity(model, calib, [sp])
    table, est = out['table'][sp.name], set(out['estimated'][sp.name])
    full = measured['out']['table'][sp.name]
    assert set(table) == set(full) and len(est) == 27 - 3  # only the diagonal is an option itself
    for b in (2, 4, 8):  # diagonal: measured exactly
        assert (b, b, b) not in est and table[(b, b, b)] == pytest.approx(full[(b, b, b)], rel=1e-5)
    opts = sorted(full)
    rank = lambda d: {o: r for r, o in enumerate(sorted(opts, key=d.get))}  # noqa: E731
    ra, rb = rank(table), rank(full)
    n = len(opts)
    rho = 1 - 6 * sum((ra[o] - rb[o]) ** 2 for o in opts) / (n * (n * n - 1))
    assert rho > 0.9, rho


def test_expand_is_exact_for_additive_errors():
    sp = sensitivity.UnitSpace('u', ['u.a', 'u.b', 'u.c', 'u.d'], [(2, 4), (2, 4), (2, 4), (8, )], [4] * 4)
    per = {2: 1.0, 4: 0.25, 16: 0.0}
    assert measured_settings(sp, max_combos=2) == (sp.options, True)  # fewer options than the expansion
    f = lambda s: per[s[0]] + 2 * per[s[1]] + 3 * per[s[2]] + 0.1  # noqa: E731
    measured = {sensitivity._key(s): f(s) for s in expansion_settings(sp)}
    table, est = expand(sp, measured, exact=False)
    assert len(est) == 8 - 2
    for o in sp.options:
        assert table[o] == pytest.approx(f(o))


def test_unreadable_sensitivity_cache_is_measured_again(tmp_path):
    """An empty or corrupt cache file (a kill mid-write) is an empty cache, not a JSONDecodeError."""
    import json
    path = tmp_path / 'sensitivity_cache.json'
    for content in ('', '{"version": 1, "entr'):
        path.write_text(content)
        cache = sensitivity.SensitivityCache(str(path))
        assert cache.data == {}
        cache.put('fp', 'unit', {'4': 0.5})
        assert json.loads(path.read_text())['entries'] == {'fp': {'unit': {'4': 0.5}}}
