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


def _qdrop_unit_inputs(unit_index):
    """Run one QDrop optimisation step of a unit on caches whose float-model input is marked
    (values near 100, far outside every activation range); return what the unit's input
    quantizer received and gave, and the quantizer."""
    from mmbrecq.config import recon_config
    from mmbrecq.reconstruction import CacheBudget
    model = _model()
    mmbrecq.calibrate_activations(model, _batches())
    unit = mmbrecq.find_units(model)[unit_index]
    q = entry_quantizer(unit)
    c_in = unit.module.in_channels
    budget = CacheBudget('cpu', host_gb=1)
    g = torch.Generator().manual_seed(3)
    x_q = torch.randn(8, c_in, 8, 8, generator=g)
    x_fp = 100 + torch.rand(8, c_in, 8, 8, generator=g)
    with torch.no_grad():
        y = unit.forward(x_q)
    caches = []
    for name, t in (('x_q', x_q), ('x_fp', x_fp), ('y_fp', y)):
        cache = budget.allocate(tuple(t.shape), name=name)
        cache.write(0, t)
        caches.append(cache)
    data = optimize.UnitData([caches[0]], [caches[1]], [caches[2]], None)
    seen = []

    def record(m, args, out):  # the input, the output, and the input wholly quantized (same step size)
        mask = m.stream_mask
        with torch.no_grad():
            m.set_stream_mask(torch.ones_like(args[0], dtype=torch.bool))
            whole = m.quantize(args[0])
            m.set_stream_mask(mask)
        seen.append((args[0].detach().clone(), out.detach().clone(), whole))

    h = q.register_forward_hook(record)
    cfg = recon_config(dict(iters=1, batch_size=4, input_mix='qdrop', loss='mse'))
    try:
        optimize.optimise_unit(unit, data, cfg, seed=0, input_learned=unit_index > 0)
    finally:
        h.remove()
    return seen[0]


def test_qdrop_drops_quantization_at_the_unit_input():
    """QDrop (Wei et al., 2022; reference recon.py): the unit reads
    ``where(rand < p, Q(x_quantized_stream), x_float_model)``. The float-model elements
    reach the unit unquantized, the quantized-stream ones quantized, whether the unit's input
    quantizer is frozen (chained unit '3': learned with the previous unit) or learned with the
    unit (the first unit)."""
    for unit_index in (0, 2):
        inp, out, quantized = _qdrop_unit_inputs(unit_index)
        from_fp = inp > 50
        assert 0.3 < from_fp.float().mean() < 0.7, unit_index  # qdrop_prob 0.5 of each stream
        # the float-model elements pass unquantized ...
        assert torch.equal(out[from_fp], inp[from_fp]), unit_index
        # ... and every quantized-stream element is quantized
        assert torch.equal(out[~from_fp], quantized[~from_fp]), unit_index
        assert not torch.equal(out[~from_fp], inp[~from_fp]), unit_index
