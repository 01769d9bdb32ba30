"""Reconstruction on 2 CPU processes (gloo) equals the single-process run on the same global
batches and seed: calibration sharding, range-init reduction, gradient all-reduce, reduced
logs, rank-0 files, distributed resume.

Each distributed test spawns 2 processes (``tests/_dist.py``); the single-process reference
runs the same worker function in the test process (no process group: world size 1). 15-30 s
each on 2 shared CPU cores (mostly the two processes' imports).

Measured (4 units, 5,616 weights, 130 steps): hard rounding decisions 100 % identical, weight
scales identical, activation steps within 2e-3 of one Adam step (act_lr), logged losses within
1e-7 relative; per-step gradients (learning rates 0, 160 steps with empty local batches) within
1e-7 of each parameter's largest gradient of the single-process gradient of the global batch.
"""
import os

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import mmbrecq
from mmbrecq.quantizers import LSQQuantizer
from mmbrecq.reconstruction.distributed import StepSharding
from mmbrecq.utils.dist import shard_batch

from _dist import spawn

torch.set_num_threads(1)

QCFG = dict(w_bits=4, a_bits=4, weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='lp'))
RECON = dict(iters=130, batch_size=8, progress=False, check_every=50)


def _model(seed=0, c=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                         nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 4, 3, padding=1))


def _global_batches(sizes=(8, 8, 8, 8), shape=(3, 10, 10), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, ) + shape, generator=g) for n in sizes]


def _my_batches(batches):
    """This process's shard of the global batches (everything on one process)."""
    out, offset = [], 0
    for b in batches:
        part = shard_batch(b, offset)
        if part is not None:
            out.append(part)
        offset += len(b)
    return out


def _reconstruct(rank, world_size, recon, work_dir, qcfg=QCFG, sizes=(8, 8, 8, 8), plot=True):
    qmodel = mmbrecq.quantize_model(_model(), qcfg)
    batches = _my_batches(_global_batches(sizes))
    mmbrecq.calibrate_activations(qmodel, batches[:1])
    records = mmbrecq.reconstruct(qmodel, batches, recon, work_dir=work_dir, plot=plot)
    return dict(state=qmodel.state_dict(), records=[{k: v for k, v in r.items() if k != 'history'}
                                                    for r in records], samples=sum(len(b) for b in batches))


def _compare(single, dist_state, act_lr=4e-5):
    """(max difference of the activation steps in Adam steps (units of ``act_lr``), max relative
    difference of the weight scales, hard-rounding agreement, number of weights)."""
    step_diff, scale_diff, same, total = 0.0, 0.0, 0, 0
    for k, v in single.items():
        if not isinstance(v, torch.Tensor):
            continue
        w = dist_state[k]
        if k.endswith('alpha'):
            same += int(((v >= 0) == (w >= 0)).sum())
            total += v.numel()
        elif k.endswith('.scale') and 'weight_quantizer' in k:
            scale_diff = max(scale_diff, float(((v - w).abs() / v.abs().clamp_min(1e-12)).max()))
        elif k.endswith('.scale'):
            step_diff = max(step_diff, float((v - w).abs().max()) / act_lr)
    return step_diff, scale_diff, same / total, total


def test_single_process_sharding_is_the_identity():
    class Data:
        num_samples, index_device = 10, torch.device('cpu')
    shard = StepSharding(Data(), 4)
    idx = torch.tensor([3, 1, 9, 9])
    local, share = shard.local(idx)
    assert local is idx and share == 1.0 and not shard.active


# ---------------------------------------------------------------------------------------
# range initialisation
# ---------------------------------------------------------------------------------------
def _ranges(rank, world_size, n_first=7):
    out = {}
    for init in ('lp', 'minmax'):
        qcfg = dict(QCFG, act_quantizer=dict(type='LSQQuantizer', init=init))
        qmodel = mmbrecq.quantize_model(_model(), qcfg)
        # 64x64 images: the conv outputs of the first batch exceed the Lp search's 2^18 elements
        # (the search subsamples them: the ranks must keep the single process's elements)
        batches = _my_batches(_global_batches(sizes=(n_first, 8), shape=(3, 64, 64)))
        mmbrecq.calibrate_activations(qmodel, batches[:1])
        out[init] = {n: (q.scale.detach().clone(), q.zero_point.clone()) for n, q in qmodel.named_modules()
                     if isinstance(q, LSQQuantizer)}
    return out


def test_range_init_reduction_gives_the_single_process_ranges(tmp_path):
    single = _ranges(0, 1)   # first batch of 7 (odd): the ranks hold 4 and 3 of its samples
    ranks = spawn(_ranges, 2, tmp_path)
    for init, ranges in single.items():
        for name, (scale, zp) in ranges.items():
            for r in ranks:
                torch.testing.assert_close(r[init][name][0], scale, rtol=1e-6, atol=0)
                assert torch.equal(r[init][name][1], zp), (init, name)


# ---------------------------------------------------------------------------------------
# reconstruction = single process
# ---------------------------------------------------------------------------------------
def _reconstruct_per_rank_dir(rank, world_size, recon, base):
    return _reconstruct(rank, world_size, recon, os.path.join(base, f'rank{rank}'))


@pytest.mark.parametrize('recon', [
    RECON,
    # the Fisher normalisation mean(g^2) summed over the ranks' shards; two optimisation stages
    pytest.param(dict(RECON, fisher_weight='normalized', act_mode='two_stage', act_iters=60), marks=pytest.mark.slow)],
    ids=['joint', 'two_stage_normalized'])
def test_two_processes_equal_one(recon, tmp_path):
    single = _reconstruct(0, 1, recon, None)
    ranks = spawn(_reconstruct_per_rank_dir, 2, tmp_path / 'out', recon, str(tmp_path / 'wd'))
    assert [r['samples'] for r in ranks] == [16, 16]
    # the ranks hold identical parameters
    for k, v in ranks[0]['state'].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, ranks[1]['state'][k]), k
    step_diff, scale_diff, agree, n = _compare(single['state'], ranks[0]['state'])
    print(f'\n[{recon.get("act_mode", "joint")}] activation steps max diff {step_diff:.2e} Adam steps, '
          f'weight scales {scale_diff:.2e}, hard rounding agreement {100 * agree:.3f} % of {n} weights')
    assert scale_diff == 0
    # float summation order only (per-rank partial sums, then the all-reduce), which Adam's
    # normalisation amplifies where a step's gradient is near zero: a fraction of one Adam step
    # (measured 0.06 with the torch code, 0.11 with the fused CPU kernels' double sums)
    assert step_diff < 0.25
    assert agree >= 0.995
    # logged losses are the global batch's (reduced), equal to one process's
    for a, b in zip(single['records'], ranks[0]['records']):
        assert a['name'] == b['name']
        assert b['loss_start'] == pytest.approx(a['loss_start'], rel=1e-5)
        assert b['loss_end'] == pytest.approx(a['loss_end'], rel=1e-3)
        assert b['round_end'] == pytest.approx(a['round_end'], rel=1e-3, abs=1e-6)
    # rank 0 alone writes the resume state and the plot
    assert sorted(os.listdir(tmp_path / 'wd' / 'rank0')) == ['recon_losses.png', 'recon_state.pth']
    assert os.listdir(tmp_path / 'wd' / 'rank1') == []


UNEVEN = dict(RECON, iters=40, batch_size=3)
#: learning rates 0: the parameters never move, so every step's gradient is comparable with the
#: single process's (with learning, float noise in near-zero step gradients grows step by step)
FROZEN = dict(UNEVEN, weight_lr=0.0, act_lr=0.0)


def _with_step_grads(fn):
    """``fn()`` and the gradients every optimiser step applied (after the all-reduce)."""
    grads = []

    def record(opt, args, kwargs):
        grads.append([None if p.grad is None else p.grad.detach().clone()
                      for g in opt.param_groups for p in g['params']])
    handle = register_optimizer_step_pre_hook(record)
    try:
        return fn(), grads
    finally:
        handle.remove()


def _uneven_and_qdrop(rank, world_size):
    # 3 batches of 5: the ranks hold 8 and 7 samples; a global batch of 3 has no sample of a
    # given rank in 1/8 of the steps
    _, grads = _with_step_grads(lambda: _reconstruct(rank, world_size, FROZEN, None, sizes=(5, 5, 5)))
    return dict(uneven=_reconstruct(rank, world_size, UNEVEN, None, sizes=(5, 5, 5)), grads=grads,
                qdrop=_reconstruct(rank, world_size, dict(RECON, iters=20, input_mix='qdrop'), None))


def test_uneven_shards_empty_local_batches_and_qdrop(tmp_path):
    _, single_grads = _with_step_grads(lambda: _reconstruct(0, 1, FROZEN, None, sizes=(5, 5, 5)))
    single = _reconstruct(0, 1, UNEVEN, None, sizes=(5, 5, 5))
    ranks = spawn(_uneven_and_qdrop, 2, tmp_path)
    # every step applies the single-process gradient of the global batch (alpha and steps)
    assert len(ranks[0]['grads']) == len(single_grads) == 4 * UNEVEN['iters']
    # each difference relative to that parameter's largest gradient over the steps: a step
    # gradient is a sum of signed terms that can cancel to near zero in one step (measured:
    # 4.6e-8 against a difference of 2.6e-11, 6e-4 of itself), where only the summation order
    # differs between the runs
    scales = {}
    for gs in single_grads:
        for k, a in enumerate(gs):
            if a is not None:
                scales[k] = max(scales.get(k, 0.0), float(a.norm()))
    worst, where = 0.0, None
    for step, (gs, gd) in enumerate(zip(single_grads, ranks[0]['grads'])):
        for k, (a, b) in enumerate(zip(gs, gd)):
            assert (a is None) == (b is None), step
            if a is not None:
                rel = float((a - b).norm()) / max(scales[k], 1e-30)
                if rel > worst:
                    worst, where = rel, (step, k, tuple(a.shape))
    print(f'\nworst gradient difference over {len(single_grads)} steps, relative to the parameter\'s '
          f'largest gradient: {worst:.2e} at (step, parameter, shape) {where}')
    assert worst < 1e-4   # float summation order (weight gradients of a conv summed per rank)
    assert [r['uneven']['samples'] for r in ranks] == [8, 7]
    step_diff, scale_diff, agree, n = _compare(single['state'], ranks[0]['uneven']['state'])
    assert step_diff < 0.1 and scale_diff == 0 and agree >= 0.995
    # QDrop: masks drawn per rank (not the single-process draws), parameters still identical on the ranks
    for k, v in ranks[0]['qdrop']['state'].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, ranks[1]['qdrop']['state'][k]), k


# ---------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------
class _Crash:
    def after_recon_unit(self, runner, index, unit, record, records):
        if index == 1:
            raise KeyboardInterrupt('simulated crash after the second unit')


def _resume(rank, world_size, base):
    recon = dict(RECON, iters=30)
    full = _reconstruct(rank, world_size, recon, os.path.join(base, 'full'), plot=False)['state']
    wd = os.path.join(base, 'resumed')
    qmodel = mmbrecq.quantize_model(_model(), QCFG)
    batches = _my_batches(_global_batches())
    mmbrecq.calibrate_activations(qmodel, batches[:1])
    try:
        mmbrecq.reconstruct(qmodel, batches, recon, work_dir=wd, plot=False, hooks=[_Crash()])
    except KeyboardInterrupt:
        pass
    done = torch.load(os.path.join(wd, 'recon_state.pth'), weights_only=True)['done']
    qmodel = mmbrecq.quantize_model(_model(), QCFG)  # a fresh process's model: every rank loads the state
    mmbrecq.calibrate_activations(qmodel, batches[:1])
    mmbrecq.reconstruct(qmodel, batches, recon, work_dir=wd, resume=True, plot=False)
    return dict(full=full, resumed=qmodel.state_dict(), done=done)


def test_distributed_resume_equals_an_uninterrupted_run(tmp_path):
    ranks = spawn(_resume, 2, tmp_path / 'out', str(tmp_path))
    assert ranks[0]['done'] == ['0', '2']
    for r in ranks:
        for k, v in r['full'].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, r['resumed'][k]), k
