"""mmbrecq.reconstruct end to end on tiny models: final state, loss decrease, resume,
non-finite losses, every option, determinism."""
import copy
import os

import pytest
import torch
from torch import nn

import mmbrecq
import mmbrecq.reconstruction.optimize as optimize_mod
from mmbrecq.modules import QuantLayerMixin, quantizers_of
from mmbrecq.quantizers import AdaRoundQuantizer
from mmbrecq.reconstruction import CalibrationSet, NonFiniteLoss
from mmbrecq.utils import CheckpointError

torch.set_num_threads(1)

FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))
BASE = dict(iters=3, batch_size=4, progress=False)
UNITS = ['0', '2', '3', '5']     # '3' reads '2''s output directly: chained


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def _quantized(build=_tiny, **quant_cfg):
    return mmbrecq.quantize_model(build(), dict(FAST, **dict(dict(w_bits=4, a_bits=4), **quant_cfg)))


def _batches(n=2, bs=4, seed=1, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((bs, ) + shape, generator=g) for _ in range(n)]


def _float_params(model):
    return {n: p for n, p in model.named_parameters() if 'quantizer' not in n}


def _assert_state_dicts_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@torch.no_grad()
def _outputs(model, batches):
    return torch.cat([model(b) for b in batches])


class Recorder:
    """Callback observer: which units started / finished."""

    def __init__(self):
        self.before, self.after = [], []

    def before_recon_unit(self, runner, index, unit):
        self.before.append((index, unit.name))

    def after_recon_unit(self, runner, index, unit, record, records):
        assert records[-1] is record and record['name'] == unit.name
        self.after.append((index, unit.name))


# ---------------------------------------------------------------------------------------
# (a) state after reconstruction, loss decrease
# ---------------------------------------------------------------------------------------
def test_state_after_reconstruction():
    model = _quantized()
    model[2].bias.requires_grad_(False)   # a user flag that must survive
    flags = {n: p.requires_grad for n, p in _float_params(model).items()}
    weights = {n: p.detach().clone() for n, p in _float_params(model).items()}
    batches = _batches()
    rec = Recorder()
    records = mmbrecq.reconstruct(model, batches, dict(BASE, loss='mse'), hooks=[rec])

    assert [r['name'] for r in records] == UNITS
    assert rec.before == rec.after == list(enumerate(UNITS))
    assert [r['status'] for r in records] == ['ok'] * 4
    assert [r['chained'] for r in records] == [False, False, True, False]
    assert all(r['calls'] == 1 and len(r['history']) == 3 for r in records)
    wqs = quantizers_of(model, 'weight')
    assert len(wqs) == 4 and all(isinstance(q, AdaRoundQuantizer) for q in wqs)
    assert all(q.rounding == 'hard' for q in wqs)
    assert all(not q.alpha.requires_grad for q in wqs)
    assert all(q.enabled for q in quantizers_of(model))          # quantized model at the end
    assert all(not q.training and q.qdrop_prob is None for q in quantizers_of(model, 'act'))
    # float weights untouched, never given a gradient, their flags restored
    for n, p in _float_params(model).items():
        assert torch.equal(p, weights[n]), n
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n
    assert flags['2.bias'] is False and flags['2.weight'] is True
    out = _outputs(model, batches)
    assert torch.isfinite(out).all()


def test_no_quantizer_parameter_requires_grad_after_reconstruction():
    model = _quantized()
    mmbrecq.reconstruct(model, _batches(), dict(BASE, loss='mse'))
    trainable = [n for n, p in model.named_parameters() if 'quantizer' in n and p.requires_grad]
    assert trainable == []


def test_activation_steps_are_learned():
    model = _quantized()
    batches = _batches()
    mmbrecq.calibrate_activations(model, batches[:1])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if 'input_quantizer' in n}
    assert len(before) == 4
    mmbrecq.reconstruct(model, batches, dict(BASE, iters=10, loss='mse', act_lr=1e-2))
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def _one_unit_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))


def test_reconstruction_loss_decreases_and_beats_nearest_rounding():
    """w2: a single 16->16 conv unit (the first conv stays float) against its float output."""
    build = lambda: _quantized(_one_unit_model, w_bits=2, a_bits=None, keep_8bit=[], skip=['0'])  # noqa
    batches = _batches(bs=16)
    ref = _outputs(_one_unit_model(), batches)
    nearest = build()
    err_nearest = float((_outputs(nearest, batches) - ref).pow(2).mean())
    model = build()
    (record, ) = mmbrecq.reconstruct(model, batches, dict(BASE, iters=100, batch_size=16, loss='mse',
                                                          weight_lr=1e-2))
    assert record['name'] == '2' and record['status'] == 'ok'
    assert record['loss_end'] < 0.8 * record['loss_start']
    hist = torch.tensor(record['history'])
    assert hist.shape == (100, 2) and torch.isfinite(hist).all()
    assert (hist[:20, 1] == 0).all() and (hist[20:, 1] > 0).all()   # regulariser after warm-up only
    err = float((_outputs(model, batches) - ref).pow(2).mean())
    assert err < err_nearest


# ---------------------------------------------------------------------------------------
# (b) resume
# ---------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


class InterruptAfter:
    def __init__(self, index):
        self.index = index

    def after_recon_unit(self, runner, index, unit, record, records):
        if index == self.index:
            raise Interrupt(unit.name)


@pytest.mark.parametrize('loss', ['mse', 'fisher_diag'])
def test_resume_is_bitwise_equivalent(loss, tmp_path):
    cfg = dict(BASE, loss=loss, input_mix='qdrop')
    batches = _batches()
    work_a, work_b = str(tmp_path / 'a'), str(tmp_path / 'b')
    os.makedirs(work_a)
    os.makedirs(work_b)

    model_a = _quantized()
    records_a = mmbrecq.reconstruct(model_a, batches, cfg, work_dir=work_a)

    with pytest.raises(Interrupt, match='^2$'):
        mmbrecq.reconstruct(_quantized(), batches, cfg, work_dir=work_b, hooks=[InterruptAfter(1)])
    assert os.path.isfile(os.path.join(work_b, 'recon_state.pth'))

    rec = Recorder()
    model_b = _quantized()   # fresh, identically built and swapped
    records_b = mmbrecq.reconstruct(model_b, batches, cfg, work_dir=work_b, resume=True, hooks=[rec])
    assert rec.before == [(2, '3'), (3, '5')]     # the first two units are not redone
    assert [r['name'] for r in records_b] == UNITS
    for ra, rb in zip(records_a, records_b):
        for key in ('name', 'status', 'loss_start', 'loss_end', 'round_end', 'history'):
            assert ra[key] == rb[key], (ra['name'], key)
    _assert_state_dicts_equal(model_a.state_dict(), model_b.state_dict())
    assert torch.equal(_outputs(model_a, batches), _outputs(model_b, batches))


def test_resume_after_completion_redoes_nothing(tmp_path):
    batches = _batches()
    model = _quantized()
    mmbrecq.reconstruct(model, batches, dict(BASE, loss='mse'), work_dir=str(tmp_path))
    rec = Recorder()
    again = _quantized()
    records = mmbrecq.reconstruct(again, batches, dict(BASE, loss='mse'), work_dir=str(tmp_path),
                                  resume=True, hooks=[rec])
    assert rec.before == [] and [r['name'] for r in records] == UNITS
    _assert_state_dicts_equal(model.state_dict(), again.state_dict())


def test_resume_without_state_starts_from_the_first_unit(tmp_path):
    rec = Recorder()
    mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE, loss='mse'), work_dir=str(tmp_path),
                        resume=True, hooks=[rec])
    assert [name for _, name in rec.before] == UNITS


def test_resume_state_of_another_model_is_refused(tmp_path):
    mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE, loss='mse'), work_dir=str(tmp_path))
    torch.manual_seed(0)
    other = mmbrecq.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)), FAST)
    with pytest.raises(CheckpointError, match='another model'):
        mmbrecq.reconstruct(other, _batches(), dict(BASE, loss='mse'), work_dir=str(tmp_path), resume=True)


# ---------------------------------------------------------------------------------------
# (c) non-finite losses
# ---------------------------------------------------------------------------------------
class NanFor:
    """Makes the reconstruction loss NaN while one unit is optimised; snapshots that unit."""

    def __init__(self, monkeypatch, name):
        self.name, self.current, self.snapshot = name, None, None
        real, real_quantized = optimize_mod.reconstruction_loss, optimize_mod.quantized_reconstruction_loss

        def nan_if_current(value):
            return value * float('nan') if self.current == self.name else value

        monkeypatch.setattr(optimize_mod, 'reconstruction_loss', lambda *a: nan_if_current(real(*a)))
        # a unit that learns its successor's input step uses the fused output-quantizer loss
        monkeypatch.setattr(optimize_mod, 'quantized_reconstruction_loss',
                            lambda *a: nan_if_current(real_quantized(*a)))

    def before_recon_unit(self, runner, index, unit):
        self.current = unit.name
        if unit.name == self.name:
            self.snapshot = copy.deepcopy(unit.module.state_dict())


@pytest.mark.parametrize('loss', ['mse', 'fisher_diag'])
def test_non_finite_loss_fails_naming_the_unit(loss, monkeypatch):
    model = _quantized()
    model[3].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in _float_params(model).items()}
    nan = NanFor(monkeypatch, '2')
    with pytest.raises(NonFiniteLoss, match=r"unit '2' \(Conv2d\)"):
        mmbrecq.reconstruct(model, _batches(), dict(BASE, loss=loss, on_nan='fail'), hooks=[nan])
    # the failed unit is restored, the user's flags too
    _assert_state_dicts_equal(model[2].state_dict(), nan.snapshot)
    assert model[2].weight_quantizer.rounding == 'nearest'
    assert {n: p.requires_grad for n, p in _float_params(model).items()} == flags


def test_non_finite_loss_falls_back_to_nearest(monkeypatch):
    model = _quantized()
    nan = NanFor(monkeypatch, '2')
    batches = _batches()
    records = mmbrecq.reconstruct(model, batches, dict(BASE, loss='mse', on_nan='nearest'), hooks=[nan])
    assert [r['status'] for r in records] == ['ok', 'nearest_fallback', 'ok', 'ok']
    bad = records[1]
    assert bad['name'] == '2' and bad['loss_start'] is None and bad['history'] == []
    assert model[2].weight_quantizer.rounding == 'nearest'
    assert [model[i].weight_quantizer.rounding for i in (0, 3, 5)] == ['hard'] * 3
    _assert_state_dicts_equal(model[2].state_dict(), nan.snapshot)   # nothing half-learned kept
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    assert torch.isfinite(_outputs(model, batches)).all()


def test_non_finite_loss_is_caught_between_checks(monkeypatch):
    """check_every > iters: the last iteration still checks."""
    nan = NanFor(monkeypatch, '5')
    with pytest.raises(NonFiniteLoss, match="'5'"):
        mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE, loss='mse', check_every=1000), hooks=[nan])


# ---------------------------------------------------------------------------------------
# (d) every option runs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('input_mix', ['fp', 'quant', 'qdrop'])
@pytest.mark.parametrize('loss,fisher', [('mse', 'normalized'), ('fisher_diag', 'normalized'),
                                         ('fisher_diag', 'abs_plus_one'), ('fisher_diag', 'raw')])
def test_options_run(input_mix, loss, fisher):
    model = _quantized()
    batches = _batches()
    records = mmbrecq.reconstruct(model, batches, dict(BASE, input_mix=input_mix, loss=loss, fisher_weight=fisher))
    assert [r['status'] for r in records] == ['ok'] * 4
    assert all(r['loss_start'] is not None and r['loss_end'] == r['loss_end'] for r in records)
    assert all(q.rounding == 'hard' for q in quantizers_of(model, 'weight'))
    assert all(q.qdrop_prob is None for q in quantizers_of(model, 'act'))
    assert torch.isfinite(_outputs(model, batches)).all()


def test_two_stage_runs():
    model = _quantized()
    batches = _batches()
    records = mmbrecq.reconstruct(model, batches, dict(BASE, act_mode='two_stage', act_iters=2, loss='mse'))
    assert [len(r['history']) for r in records] == [5] * 4
    assert torch.isfinite(_outputs(model, batches)).all()


def test_two_pass_is_the_reference_global_order(tmp_path, monkeypatch):
    """``act_mode='two_pass'``: all units' rounding with activations float everywhere, then
    the activation ranges searched again on the weight-quantized model, then all units'
    steps with the rounding kept; resumable in either pass."""
    batches = _batches()
    cfg = dict(BASE, act_mode='two_pass', act_iters=2, loss='mse', act_lr=1e-2)
    model = _quantized()
    seen = {}

    import mmbrecq.reconstruction.reconstructor as recon_mod
    optimise = recon_mod.optimise_unit

    def watched(unit, *args, **kwargs):  # the stream the unit's inputs came from
        seen.setdefault('acts_on', []).append(any(q.enabled for q in quantizers_of(model, 'act')))
        return optimise(unit, *args, **kwargs)

    monkeypatch.setattr(recon_mod, 'optimise_unit', watched)

    class Watch:
        def after_recon_unit(self, runner, index, unit, record, records):
            if record['stage'] == 'weights' and unit.name == UNITS[-1]:
                seen['weights'] = {n: q(m.weight).detach().clone() for n, m in model.named_modules()
                                   if isinstance(m, QuantLayerMixin) for q in [m.weight_quantizer]}
                seen['steps'] = [q.scale.detach().clone() for q in quantizers_of(model, 'act')]

    records = mmbrecq.reconstruct(model, batches, cfg, work_dir=str(tmp_path / 'a'), hooks=[Watch()])
    assert [(r['stage'], r['name']) for r in records] == [('weights', u) for u in UNITS] + [
        ('steps', u) for u in UNITS]
    assert [len(r['history']) for r in records] == [3] * 4 + [2] * 4
    # the weights pass ran with every activation quantizer off; the steps pass with the
    # finished units' on (none before the first unit)
    assert seen['acts_on'] == [False] * 4 + [False, True, True, True]
    # the steps pass keeps the rounding and learns the steps (ranges re-searched in between)
    for n, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            assert torch.equal(m.weight_quantizer(m.weight), seen['weights'][n]), n
    assert any(not torch.equal(q.scale, s) for q, s in zip(quantizers_of(model, 'act'), seen['steps']))
    # resume in the second pass: same model
    class InterruptInStepsPass:
        def after_recon_unit(self, runner, index, unit, record, records):
            if len(records) == 6:   # the weights pass and two units of the steps pass
                raise Interrupt(unit.name)

    with pytest.raises(Interrupt, match='^2$'):
        mmbrecq.reconstruct(_quantized(), batches, cfg, work_dir=str(tmp_path / 'b'), hooks=[InterruptInStepsPass()])
    again = _quantized()
    rec = Recorder()
    mmbrecq.reconstruct(again, batches, cfg, work_dir=str(tmp_path / 'b'), resume=True, hooks=[rec])
    assert rec.before == [(2, '3'), (3, '5')]
    _assert_state_dicts_equal(model.state_dict(), again.state_dict())


def _blocky():
    from mmpretrain.models.backbones.resnet import BasicBlock
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8), BasicBlock(8, 8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


class _CifarNet(nn.Module):
    """mmpretrain's CIFAR ResNet (stem conv → BN → ReLU → layer1, no max-pool) + a linear head."""

    def __init__(self):
        super().__init__()
        from mmpretrain.models.backbones import ResNet_CIFAR
        torch.manual_seed(0)
        self.backbone = ResNet_CIFAR(depth=18, stem_channels=8, base_channels=8, num_stages=2, strides=(1, 2),
                                     dilations=(1, 1), out_indices=(1, ))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def test_stem_unit_with_tail_is_logged_and_feeds_layer1_directly():
    model = _quantized(lambda: _CifarNet().eval())
    records = mmbrecq.reconstruct(model, _batches(), dict(BASE, loss='fisher_diag'))
    assert records[0]['name'] == 'backbone.conv1' and records[0]['kind'] == 'Conv2d+Identity+ReLU'
    assert records[1]['name'] == 'backbone.layer1.0' and records[1]['chained']
    assert all(r['status'] == 'ok' for r in records)


@pytest.mark.parametrize('granularity', ['block', 'layer'])
def test_granularity(granularity):
    model = _quantized(_blocky)
    batches = _batches()
    records = mmbrecq.reconstruct(model, batches, dict(BASE, granularity=granularity, loss='fisher_diag'))
    names = [r['name'] for r in records]
    if granularity == 'block':
        assert names == ['0', '1', '2', '5']
        assert [r['kind'] for r in records] == ['Conv2d', 'BasicBlock', 'BasicBlock', 'Linear']
        assert [r['chained'] for r in records] == [False, True, True, False]   # the stem conv feeds block 1
    else:
        layers = [n for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]
        assert names == layers == ['0', '1.conv1', '1.conv2', '2.conv1', '2.conv2', '5']
    assert all(r['status'] == 'ok' for r in records)
    assert all(q.rounding == 'hard' for q in quantizers_of(model, 'weight'))
    assert torch.isfinite(_outputs(model, batches)).all()


def test_layer_granularity_reconstructs_on_quantized_block_inputs():
    model = _quantized(_blocky)
    block = model[2]
    window = {'in': False}
    enabled_calls = []

    class Window:
        def before_recon_unit(self, runner, index, unit):
            window['in'] = unit.name == '2.conv1'

    def watch(module, args, out):
        if window['in']:
            enabled_calls.append(module.enabled)

    h = block.input_quantizer.register_forward_hook(watch)
    mmbrecq.reconstruct(model, _batches(), dict(BASE, granularity='layer', loss='mse'), hooks=[Window()])
    h.remove()
    # the block's input quantizer runs while 2.conv1 is captured (float and quantized streams) ...
    assert enabled_calls
    # ... and it is on at least for the quantized stream, as in the final model
    assert any(enabled_calls)


def test_disk_cache_placement_and_cleanup(tmp_path):
    records = mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE, loss='fisher_diag', cache=dict(host_gb=0)),
                                  work_dir=str(tmp_path))
    assert all('disk' in r['cache'] for r in records)
    assert sorted(os.listdir(str(tmp_path))) == ['recon_losses.png', 'recon_state.pth']  # every memmap removed


def test_cache_disk_dir_option(tmp_path):
    disk, work = tmp_path / 'disk', tmp_path / 'work'
    disk.mkdir()
    work.mkdir()
    seen = []

    class Look:
        def after_recon_unit(self, runner, index, unit, record, records):
            seen.append((sorted(os.listdir(str(disk))), sorted(os.listdir(str(work)))))

    records = mmbrecq.reconstruct(_quantized(), _batches(),
                                  dict(BASE, loss='mse', cache=dict(host_gb=0, disk_dir=str(disk))),
                                  work_dir=str(work), hooks=[Look()])
    assert all('disk' in r['cache'] for r in records)
    # the carried caches live in disk_dir between units, never in the work dir
    assert all(any(f.endswith('.bin') for f in d) and not any(f.endswith('.bin') for f in w) for d, w in seen)
    assert os.listdir(str(disk)) == []


def test_interrupted_run_leaves_no_disk_cache(tmp_path):
    with pytest.raises(Interrupt):
        mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE, loss='fisher_diag', cache=dict(host_gb=0)),
                            work_dir=str(tmp_path), hooks=[InterruptAfter(1)])
    assert not [f for f in os.listdir(str(tmp_path)) if f.endswith('.bin')]


def test_missing_work_dir_is_created(tmp_path):
    work = str(tmp_path / 'new' / 'dir')
    mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE, loss='mse'), work_dir=work)
    assert os.path.isfile(os.path.join(work, 'recon_state.pth'))


def test_calibration_set_with_custom_forward():
    model = _quantized()
    batches = [dict(inputs=b) for b in _batches()]
    calib = CalibrationSet(batches, lambda m, batch: m(batch['inputs']))
    records = mmbrecq.reconstruct(model, calib, dict(BASE, loss='fisher_diag'))
    assert len(records) == 4
    records = mmbrecq.reconstruct(_quantized(), batches, dict(BASE, loss='mse'),
                                  forward=lambda m, batch: m(batch['inputs']))
    assert len(records) == 4


def test_unknown_reconstructor_type_is_named():
    with pytest.raises(ValueError, match=r'quant_cfg\.recon\.type'):
        mmbrecq.reconstruct(_quantized(), _batches(), dict(type='NoSuchReconstructor'))
    with pytest.raises(ValueError, match=r'quant_cfg\.recon\.loss'):
        mmbrecq.reconstruct(_quantized(), _batches(), dict(loss='l1'))


def test_unswapped_model_is_refused():
    with pytest.raises(ValueError, match='quantize_model'):
        mmbrecq.reconstruct(_tiny(), _batches(), dict(BASE))


# ---------------------------------------------------------------------------------------
# (e) determinism
# ---------------------------------------------------------------------------------------
def _run(seed, **cfg):
    model = _quantized()
    mmbrecq.reconstruct(model, _batches(), dict(BASE, iters=5, seed=seed, **cfg))
    return model.state_dict()


def test_same_seed_same_result_bitwise():
    cfg = dict(loss='fisher_diag', input_mix='qdrop')
    a, b = _run(0, **cfg), _run(0, **cfg)
    _assert_state_dicts_equal(a, b)
    c = _run(1, **cfg)
    alphas = [k for k in a if k.endswith('alpha')]
    assert any(not torch.equal(a[k], c[k]) for k in alphas)    # the seed is really used


def test_api_writes_loss_plot_unless_disabled(tmp_path):
    mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE), work_dir=str(tmp_path / 'a'))
    png = tmp_path / 'a' / 'recon_losses.png'
    assert png.is_file() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE), work_dir=str(tmp_path / 'b'), plot=False)
    assert not (tmp_path / 'b' / 'recon_losses.png').exists()


@pytest.mark.parametrize('act_mode', ['joint', 'two_stage'])
def test_chained_input_step_is_learned_by_the_previous_unit(act_mode):
    """Unit '3' reads unit '2''s output: its input step is learned as '2''s output
    quantizer (as the reference's post-add+ReLU quantizer) and stays fixed in '3'."""
    model = _quantized()
    q3 = model.get_submodule('3').input_quantizer
    steps = {}

    class Watch:
        def before_recon_unit(self, runner, index, unit):
            steps[('before', unit.name)] = q3.scale.detach().clone()

        def after_recon_unit(self, runner, index, unit, record, records):
            steps[('after', unit.name)] = q3.scale.detach().clone()

    mmbrecq.reconstruct(model, _batches(), dict(BASE, iters=20, act_mode=act_mode, act_lr=1e-2),
                        hooks=[Watch()])
    assert not torch.equal(steps[('before', '2')], steps[('after', '2')])   # learned with unit '2'
    assert torch.equal(steps[('before', '3')], steps[('after', '3')])       # fixed in unit '3'
    assert not q3.scale.requires_grad


def test_calibration_batches_of_different_sizes_are_a_clear_error():
    """Caches hold one shape per unit: mixed image sizes name the unit and the batch."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    q = mmbrecq.quantize_model(model.eval(), dict(FAST, w_bits=4, a_bits=4))
    batches = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 10, 10)]
    with pytest.raises(ValueError, match=r"unit '0'.*batch 1"):
        mmbrecq.reconstruct(q, batches, dict(BASE))


@pytest.mark.parametrize('mix,expect_fp', [('quant', False), ('fp', True), ('qdrop', True)])
def test_float_input_cached_only_when_the_optimisation_reads_it(monkeypatch, mix, expect_fp):
    """'quant' mode never reads the float input of a non-chained unit: no cache for it."""
    from mmbrecq.reconstruction.cache import CacheBudget
    names, allocate = [], CacheBudget.allocate

    def spy(self, shape, dtype=torch.float32, name='cache', rows=1):
        names.append(name)
        return allocate(self, shape, dtype, name, rows)

    monkeypatch.setattr(CacheBudget, 'allocate', spy)
    mmbrecq.reconstruct(_quantized(), _batches(), dict(BASE, loss='mse', input_mix=mix))
    assert any(n.startswith('x_fp') for n in names) == expect_fp
