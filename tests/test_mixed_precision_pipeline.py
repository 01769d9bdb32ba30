"""The mixed-precision stage on the real digits model: budget met, bit map written and
applied to the quantizers, infeasible budgets, resume, and checkpoints of mixed-bit models."""
import json

import pytest
import torch

import mmbrecq.mixed_precision.pipeline as pipeline
from mmbrecq.engine import load_quantized, save_quantized
from mmbrecq.mixed_precision import (
    BOPs,
    ModelSize,
    apply_bit_map,
    search_mixed_precision,
    trace_layer_stats,
    weight_bits_of,
)
from mmbrecq.modules import QuantLayerMixin

from _mixed_precision import digits, logits, quantized_digits

torch.set_num_threads(1)
MP = dict(type='GeneticSearcher', budget=dict(size_mb='uniform_w3'), candidates=(2, 4, 8), seed=0)


@pytest.fixture(scope='module')
def searched(tmp_path_factory):
    work = tmp_path_factory.mktemp('mp')
    model, qcfg, calib = quantized_digits(MP)
    summary = search_mixed_precision(model, calib, qcfg, work_dir=str(work), logger='silent')
    with open(work / 'mixed_precision.json') as f:
        report = json.load(f)
    return dict(model=model, qcfg=qcfg, calib=calib, summary=summary, report=report, work=work)


def _costs(model, calib):
    stats = trace_layer_stats(model, calib.forward, calib.batches[0])
    cfg = {}
    blocks = {n: getattr(m, 'input_quantizer', None) for n, m in model.named_modules()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):  # an entry layer of a block reads the block's quantized input
            q, prefix = m.input_quantizer, name
            while q is None:
                prefix = prefix.rsplit('.', 1)[0]
                q = blocks[prefix]
            cfg[name] = (m.weight_quantizer.bits, q.bits)
    return ModelSize(stats)(cfg), BOPs(stats)(cfg)


def test_budget_met_on_the_real_model(searched):
    report, summary = searched['report'], searched['summary']
    uniform3 = report['uniform']['3']['size_mb']
    assert report['budget'] == dict(key='size_mb', value=pytest.approx(uniform3), spec='uniform_w3')
    assert report['cost']['size_mb'] <= report['budget']['value'] and report['budget_met']
    # the size the cost models measure on the re-gridded model is the reported one
    size, bops = _costs(searched['model'], searched['calib'])
    assert size == pytest.approx(report['cost']['size_mb']) and size <= uniform3
    assert summary['size_mb'] == pytest.approx(size) and summary['budget_met'] is True
    assert summary['bops'] > 0 and summary['bit_map'].endswith('mixed_precision.json')
    assert 2.5 < report['mean_w_bits_searched'] <= 3.0
    assert (searched['work'] / 'mp_sensitivity.png').stat().st_size > 1000


def test_bit_map_applied_to_the_quantizers(searched):
    model, report = searched['model'], searched['report']
    bits = weight_bits_of(model)
    assert bits == report['bit_map']
    assert set(bits.values()) <= {2, 4, 8} and len(set(bits.values())) > 1  # really mixed
    assert bits['backbone.conv1'] == 8 and bits['head.fc'] == 8  # keep_8bit
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            q = m.weight_quantizer
            assert (q.qmin, q.qmax) == (0, 2 ** q.bits - 1) and q.initialized
            # the range was searched again at the new width: every code of the grid in use
            codes = q.integer_repr(m.weight)
            assert codes.min() >= 0 and codes.max() <= q.qmax and len(codes.unique()) > 2 ** q.bits // 2
    for u in report['units']:  # per-unit choice consistent with the per-layer map
        assert [report['bit_map'][n] for n in u['layers']] == u['bits']
    out = logits(model, searched['calib'])
    assert torch.isfinite(out).all()


def test_infeasible_budget_names_the_smallest_cost():
    model, qcfg, calib = quantized_digits(dict(MP, budget=dict(size_mb=0.05)))
    with pytest.raises(ValueError, match=r'budget\.size_mb=0\.05 is infeasible: the smallest achievable '
                                         r'size_mb is 0\.1[0-9]+'):
        search_mixed_precision(model, calib, qcfg, logger='silent')


def test_bops_budget():
    model, qcfg, calib = quantized_digits(dict(MP, budget=dict(bops='uniform_w4')))
    summary = search_mixed_precision(model, calib, qcfg, logger='silent')
    assert summary['budget_met'] and summary['bops'] <= summary['budget']['bops']
    assert _costs(model, calib)[1] == pytest.approx(summary['bops'])


def test_resume_reuses_the_bit_map(searched, monkeypatch):
    """A resumed run reads mixed_precision.json back: no sensitivity, no search."""
    def fail(*a, **k):
        raise AssertionError('resumed run searched again')
    monkeypatch.setattr(pipeline, '_search', fail)
    model, qcfg, calib = quantized_digits(MP)
    summary = search_mixed_precision(model, calib, qcfg, work_dir=str(searched['work']), resume=True,
                                     logger='silent')
    assert summary['reused'] and weight_bits_of(model) == searched['report']['bit_map']
    # another budget in the config: refused rather than silently mixing two searches
    model, qcfg, calib = quantized_digits(dict(MP, budget=dict(size_mb='uniform_w4')))
    with pytest.raises(ValueError, match='resume: .*mixed_precision.json was searched with'):
        search_mixed_precision(model, calib, qcfg, work_dir=str(searched['work']), resume=True, logger='silent')


def test_rerun_uses_the_sensitivity_cache(searched, monkeypatch):
    """Without --resume the search runs again, from the cached sensitivities, to the same map."""
    import mmbrecq.mixed_precision.sensitivity as sensitivity
    monkeypatch.setattr(sensitivity, 'unit_error', lambda *a, **k: pytest.fail('measured again'))
    model, qcfg, calib = quantized_digits(MP)
    summary = search_mixed_precision(model, calib, qcfg, work_dir=str(searched['work']), logger='silent')
    assert not summary['reused'] and weight_bits_of(model) == searched['report']['bit_map']


def test_quantized_checkpoint_round_trip(searched, tmp_path):
    """save_quantized / load_quantized (tools/test.py) rebuild the mixed-bit model exactly."""
    model, qcfg, calib = searched['model'], searched['qcfg'], searched['calib']
    path = save_quantized(model, str(tmp_path / 'q.pth'), qcfg)
    float_model, _ = digits()
    import copy
    loaded, _ = load_quantized(copy.deepcopy(float_model), path)
    assert weight_bits_of(loaded) == weight_bits_of(model)
    assert torch.equal(logits(loaded, calib), logits(model, calib))


def test_integer_checkpoint_round_trip(searched):
    from mmbrecq.export import load_integer_checkpoint, to_integer_checkpoint
    model, qcfg, calib = searched['model'], searched['qcfg'], searched['calib']
    ckpt = to_integer_checkpoint(model, qcfg)
    float_model, _ = digits()
    import copy
    loaded = load_integer_checkpoint(copy.deepcopy(float_model), ckpt)
    assert weight_bits_of(loaded) == weight_bits_of(model)
    assert torch.equal(logits(loaded, calib), logits(model, calib))


def test_apply_bit_map_rejects_unknown_layers(searched):
    with pytest.raises(KeyError, match='backbone.nope'):
        apply_bit_map(searched['model'], {'backbone.nope': 4})
