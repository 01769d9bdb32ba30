"""optimise_unit details: a chained unit's frozen input quantizer applied to its cache once."""
import copy

import torch
from torch import nn

import mmbrecq
from mmbrecq.reconstruction import entry_quantizer, optimize
from mmbrecq.reconstruction.optimize import prequantized_input

from _models import FAST_QCFG

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1))
    return mmbrecq.quantize_model(net, FAST_QCFG)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def test_cache_quantized_once_then_quantizer_back_on():
    from mmbrecq.reconstruction import CacheBudget
    model = _model()
    mmbrecq.calibrate_activations(model, _batches())
    unit = mmbrecq.find_units(model)[2]          # '3' reads '2''s output: chained
    q = entry_quantizer(unit)
    budget = CacheBudget('cpu', host_gb=1)
    x = torch.randn(6, 8, 8, 8)
    cache = budget.allocate(tuple(x.shape), name='x_q')
    cache.write(0, x)
    data = optimize.UnitData([cache], None, [cache], None)
    with torch.no_grad():
        expect = q(x)
    with prequantized_input(unit, data, q, 'quant', chunk=4):
        assert not q.enabled
        assert torch.equal(cache.read(0, 6), expect)
    assert q.enabled
    with torch.no_grad():  # quantizing the quantized cache again changes nothing (carry-forward)
        assert torch.equal(q(cache.read(0, 6)), expect)
    for mix in ('qdrop', 'fp'):  # the float input is read too: nothing is pre-quantized
        with prequantized_input(unit, data, q, mix):
            assert q.enabled


def test_same_model_as_quantizing_every_step(monkeypatch):
    """The reconstruction result is bit-identical with and without the once-only quantization
    (unit '3' is chained to '2', so its input quantizer is frozen and pre-applied)."""
    mix = 'quant'
    base = _model()
    results = []
    for once in (True, False):
        model = copy.deepcopy(base)
        if not once:
            import contextlib
            monkeypatch.setattr(optimize, 'prequantized_input', lambda *a, **k: contextlib.nullcontext())
        mmbrecq.reconstruct(model, _batches(), dict(iters=5, batch_size=4, progress=False, input_mix=mix,
                                                    loss='mse'))
        results.append(model.state_dict())
        monkeypatch.undo()
    a, b = results
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
