"""probe_units (order, calls, shapes, chaining), run_capture (early stop, exact values) and
carry-forward capture == prefix capture on a real ResNet-18."""
import logging

import pytest
import torch
from torch import nn

import mmbrecq
from mmbrecq.modules import set_quant_state
from mmbrecq.quantizers import AdaRoundQuantizer
from mmbrecq.reconstruction import (
    BlockReconstructor,
    CacheBudget,
    CalibrationSet,
    Unit,
    find_units,
    probe_units,
    unit_layers,
)
from mmbrecq.reconstruction.capture import StopForward, run_capture
from mmbrecq.reconstruction.targets import Carry

from _models import build_classifier

torch.set_num_threads(1)


def _units(model, *names):
    return [Unit(n, model.get_submodule(n), 'test') for n in names]


def _batches(n=2, bs=2, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((bs, ) + shape, generator=g) for _ in range(n)]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Counter:
    """Counts forward calls of a module (and keeps its inputs/outputs)."""

    def __init__(self, module):
        self.n, self.ins, self.outs = 0, [], []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.n += 1
        self.ins.append(args[0].detach().clone())
        self.outs.append(out.detach().clone())


# ---------------------------------------------------------------------------------------
# probe_units
# ---------------------------------------------------------------------------------------
class ReversedOrder(nn.Module):
    """Registered b, a; executed a, b."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


def test_probe_orders_units_by_execution():
    torch.manual_seed(0)
    model = ReversedOrder()
    calib = CalibrationSet(_batches())
    units, traces = probe_units(model, _units(model, 'b', 'a'), calib)
    assert [u.name for u in units] == ['a', 'b']
    assert traces['a'].order == 0 and traces['b'].order == 1
    assert traces['a'].in_shapes == [(3, 8, 8)] and traces['a'].out_shapes == [(4, 8, 8)]
    assert traces['b'].in_shapes == [(4, 8, 8)] and traces['b'].calls == 1
    assert traces['b'].chained and not traces['a'].chained
    assert _hooks(model) == 0


def _seq(*mid):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *mid, nn.Conv2d(4, 4, 3, padding=1))


def test_direct_successor_is_chained():
    model = _seq()
    units, traces = probe_units(model, _units(model, '0', '1'), CalibrationSet(_batches()))
    assert [u.name for u in units] == ['0', '1']
    assert traces['1'].chained and not traces['0'].chained


@pytest.mark.parametrize('op', [nn.MaxPool2d(3, 1, 1), nn.ReLU(), nn.ReLU(inplace=True)],
                         ids=['maxpool', 'relu', 'relu_inplace'])
def test_op_between_units_breaks_the_chain(op):
    model = _seq(op)
    first = model[0](_batches()[0])
    assert (first < 0).any()                 # the ReLUs really change something
    _, traces = probe_units(model, _units(model, '0', '2'), CalibrationSet(_batches()))
    assert not traces['2'].chained


@pytest.mark.parametrize('inplace', [False, True])
def test_unit_with_tail_chains_to_the_next_unit(inplace):
    model = _seq(nn.ReLU(inplace=inplace), nn.MaxPool2d(3, 1, 1))
    units = [Unit('0', model[0], 'test', (model[1], model[2])), Unit('3', model[3], 'test')]
    calib = CalibrationSet(_batches())
    units, traces = probe_units(model, units, calib)
    assert traces['3'].chained and units[0].tail
    assert traces['0'].out_shapes == [(4, 8, 8)] and _hooks(model) == 0
    seen = []
    run_capture(model, units[0], calib, 1, on_output=lambda b, k, y: seen.append(y.clone()), need_output=True)
    with torch.no_grad():
        assert torch.equal(seen[0], model[2](model[1](model[0](calib.batches[0]))))


def test_tail_the_model_does_not_run_is_dropped_with_a_warning(monkeypatch):
    import mmbrecq.reconstruction.capture as capture_mod
    logged = []
    monkeypatch.setattr(capture_mod, 'print_log', lambda msg, **kw: logged.append((msg, kw.get('level'))))
    model = _seq(nn.MaxPool2d(3, 1, 1))
    wrong = nn.ReLU()  # not what the model runs after unit 0
    units = [Unit('0', model[0], 'test', (wrong, )), Unit('2', model[2], 'test')]
    units, traces = probe_units(model, units, CalibrationSet(_batches()))
    assert units[0].tail == () and not traces['2'].chained
    assert len(logged) == 1 and "['0']" in logged[0][0] and 'without it' in logged[0][0]
    assert logged[0][1] == logging.WARNING
    assert _hooks(model) == 0 and len(wrong._forward_hooks) == 0


def test_inplace_relu_same_object_values_changed_is_not_chained():
    """With ReLU(inplace=True) unit 2 receives the very tensor unit 0 returned (same
    object), modified in place: identity alone would wrongly call it chained."""
    model = _seq(nn.ReLU(inplace=True))
    seen = {}
    h0 = model[0].register_forward_hook(lambda m, a, o: seen.setdefault('out', o))
    h2 = model[2].register_forward_pre_hook(lambda m, a: seen.setdefault('in', a[0]))
    model(_batches()[0])
    h0.remove()
    h2.remove()
    assert seen['in'] is seen['out']
    _, traces = probe_units(model, _units(model, '0', '2'), CalibrationSet(_batches()))
    assert not traces['2'].chained


def test_inplace_op_that_changes_nothing_keeps_the_chain():
    model = _seq(nn.Dropout(0.5, inplace=True).eval())   # identity in eval mode
    _, traces = probe_units(model, _units(model, '0', '2'), CalibrationSet(_batches()))
    assert traces['2'].chained


class SharedHead(nn.Module):
    """A stem, then one head applied to two pyramid levels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(4, 2, 1)
        self.tail = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.pool(p3)
        return [self.tail(self.head(p)) for p in (p3, p4)]


def test_multi_call_units():
    torch.manual_seed(0)
    model = SharedHead()
    units, traces = probe_units(model, _units(model, 'tail', 'head', 'stem'), CalibrationSet(_batches()))
    assert [u.name for u in units] == ['stem', 'head', 'tail']
    head, tail = traces['head'], traces['tail']
    assert head.calls == 2 and tail.calls == 2 and traces['stem'].calls == 1
    assert head.in_shapes == [(4, 8, 8), (4, 4, 4)]
    assert head.out_shapes == [(2, 8, 8), (2, 4, 4)]
    # the head's first input is the stem output, its second is not (pooled): not chained
    assert not head.chained
    # every call of tail reads the matching call of head
    assert tail.chained


class TwiceApplied(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


def test_module_applied_twice_has_two_calls():
    torch.manual_seed(0)
    model = TwiceApplied()
    _, traces = probe_units(model, _units(model, 'conv'), CalibrationSet(_batches()))
    assert traces['conv'].calls == 2 and traces['conv'].in_shapes == [(3, 8, 8)] * 2


class Skipping(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(3, 3, 1)
        self.unused_branch = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.used(x)


def test_never_executed_unit_is_named():
    model = Skipping()
    with pytest.raises(RuntimeError, match='unused_branch'):
        probe_units(model, _units(model, 'used', 'unused_branch'), CalibrationSet(_batches()))
    assert _hooks(model) == 0


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {'y': self.conv(x)}


def test_non_tensor_output_is_an_error_naming_the_unit():
    model = nn.Sequential(DictOut())
    with pytest.raises(TypeError, match="'0'"):
        probe_units(model, _units(model, '0'), CalibrationSet(_batches()))
    assert _hooks(model) == 0


def test_probe_runs_the_float_model():
    """Shapes and chaining come from a float forward: quantizers are off while probing."""
    torch.manual_seed(0)
    model = mmbrecq.quantize_model(_seq(), dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
                                                act_quantizer=dict(type='LSQQuantizer', init='minmax')))
    # activation quantizers are not calibrated: a quantized forward would raise
    units, traces = probe_units(model, find_units(model), CalibrationSet(_batches()))
    assert [u.name for u in units] == ['0', '1'] and traces['1'].chained


def test_probe_uses_the_calibration_forward():
    model = _seq()
    seen = []

    def forward(m, batch):
        seen.append(batch['inputs'].shape)
        return m(batch['inputs'])

    calib = CalibrationSet([dict(inputs=b) for b in _batches(bs=3)], forward)
    assert calib.num_samples == 6 and calib.chunks() == [(0, 3), (3, 6)]
    probe_units(model, _units(model, '0', '1'), calib)
    assert seen == [torch.Size([3, 3, 8, 8])]    # one batch only


# ---------------------------------------------------------------------------------------
# run_capture
# ---------------------------------------------------------------------------------------
def _five():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))


@pytest.mark.parametrize('need_output', [True, False])
def test_run_capture_stops_the_forward_and_captures_exact_values(need_output):
    model = _five()
    batches = _batches(n=3)
    ref = Counter(model[2])
    with torch.no_grad():
        for b in batches:
            model(b)
    ref.handle.remove()
    after, unit_runs = Counter(model[4]), Counter(model[2])
    relu_after = Counter(model[3])
    ins, outs = [], []
    run_capture(model, _units(model, '2')[0], CalibrationSet(batches), calls=1,
                on_input=lambda b, k, x: ins.append((b, k, x.clone())),
                on_output=lambda b, k, y: outs.append((b, k, y.clone())), need_output=need_output)
    assert after.n == 0 and relu_after.n == 0          # nothing after the unit ran
    assert unit_runs.n == (3 if need_output else 0)     # the unit itself only when its output is needed
    assert [(b, k) for b, k, _ in ins] == [(0, 0), (1, 0), (2, 0)]
    for (b, _, x), r in zip(ins, ref.ins):
        assert torch.equal(x, r)
    if need_output:
        assert [(b, k) for b, k, _ in outs] == [(0, 0), (1, 0), (2, 0)]
        for (b, _, y), r in zip(outs, ref.outs):
            assert torch.equal(y, r)
    else:
        assert outs == []
    assert _hooks(model) == 3                          # only the test's own counters remain


def test_run_capture_multi_call_per_batch():
    torch.manual_seed(0)
    model = SharedHead()
    batches = _batches(n=2)
    ref = Counter(model.head)
    with torch.no_grad():
        for b in batches:
            model(b)
    ref.handle.remove()
    tail = Counter(model.tail)
    ins, outs = [], []
    run_capture(model, _units(model, 'head')[0], CalibrationSet(batches), calls=2,
                on_input=lambda b, k, x: ins.append((b, k, x.clone())),
                on_output=lambda b, k, y: outs.append((b, k, y.clone())), need_output=True)
    # call index restarts for every batch
    assert [(b, k) for b, k, _ in ins] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(b, k) for b, k, _ in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for (_, _, x), r in zip(ins, ref.ins):
        assert torch.equal(x, r)
    for (_, _, y), r in zip(outs, ref.outs):
        assert torch.equal(y, r)
    # tail runs after the first head call, but never after the second
    assert tail.n == 2


def test_run_capture_removes_hooks_on_errors():
    model = _five()

    def boom(b, k, x):
        raise KeyError('boom')

    with pytest.raises(KeyError):
        run_capture(model, _units(model, '2')[0], CalibrationSet(_batches()), calls=1, on_input=boom)
    assert _hooks(model) == 0


def test_stop_forward_does_not_escape():
    model = _five()
    run_capture(model, _units(model, '0')[0], CalibrationSet(_batches()), calls=1)   # no StopForward
    assert issubclass(StopForward, Exception)


# ---------------------------------------------------------------------------------------
# carry forward == prefix capture, on mmpretrain ResNet-18 (input_mix='quant')
# ---------------------------------------------------------------------------------------
FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _forward(model, batch):
    return model(batch, mode='tensor')


def _resnet18():
    return build_classifier('resnet/resnet18_8xb32_in1k.py', seed=0)


@torch.no_grad()
def _freeze_randomly(unit, seed):
    """What a reconstructed unit looks like: hard rounding with learned (here random) alpha."""
    g = torch.Generator().manual_seed(seed)
    for layer in unit_layers(unit).values():
        q = layer.weight_quantizer
        assert isinstance(q, AdaRoundQuantizer)
        q.set_rounding('soft', layer.weight)
        q.alpha.copy_(torch.randn(q.alpha.shape, generator=g))
        q.set_rounding('hard')


def test_carry_forward_equals_prefix_capture_resnet18():
    qmodel = mmbrecq.quantize_model(_resnet18(), dict(FAST, w_bits=4, a_bits=4))
    g = torch.Generator().manual_seed(1)
    calib = CalibrationSet([torch.randn(n, 3, 32, 32, generator=g) for n in (3, 2)], _forward)
    set_quant_state(qmodel, True, True)
    mmbrecq.calibrate_activations(qmodel, calib.batches[:1], _forward)
    rc = BlockReconstructor(input_mix='qdrop', progress=False)  # both streams cached
    budget = CacheBudget('cpu', host_gb=1)   # plenty: caches are not freed in this test
    units, traces = probe_units(qmodel, rc.units_of(qmodel), calib)
    targets = rc.targets(qmodel, calib, budget, units)
    chained = [u.name for u in units if traces[u.name].chained]
    # the stem unit ends at the max-pool (its tail), so layer1.0 reads its output directly
    assert units[0].name == 'backbone.conv1' and [type(m).__name__ for m in units[0].tail] == [
        'Identity', 'ReLU', 'MaxPool2d']
    assert chained == [f'backbone.layer{i}.{j}' for i in range(1, 5) for j in range(2)]

    done, carry, compared = [], None, 0
    for i, unit in enumerate(units):
        trace = traces[unit.name]
        use_carry = carry if trace.chained else None
        x_q, x_fp, y_fp = targets.inputs_and_target(unit, trace, 'qdrop', use_carry, done)
        if trace.chained:
            assert x_fp is carry.y_fp                      # the float input was not recomputed
            ref = targets.inputs_and_target(unit, trace, 'qdrop', None, done)
            for got, want in zip((x_q, x_fp, y_fp), ref):
                for a, b in zip(got, want):
                    assert torch.equal(a.data, b.data), unit.name
            compared += 1
        if i > 0:  # the quantized input really differs from the float one (not a vacuous check)
            assert not torch.equal(x_q[0].data, x_fp[0].data)
        _freeze_randomly(unit, seed=i)
        done.append(unit)
        carry = Carry(unit, x_q, y_fp)
    assert compared == 8
