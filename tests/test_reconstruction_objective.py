"""The objective pieces: β schedule, Fisher weights, reconstruction loss, recon config,
and the classification task loss whose gradient gives the Fisher weights."""
import copy

import pytest
import torch
from torch.nn import functional as F

from mmbrecq.config import DEFAULT_RECON, recon_config
from mmbrecq.reconstruction import ClassificationKL, RoundingSchedule, fisher_weight, reconstruction_loss
from mmbrecq.registry import TASK_LOSSES

torch.set_num_threads(1)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------
# RoundingSchedule
# ---------------------------------------------------------------------------------------
def test_schedule_warmup_then_linear_anneal():
    s = RoundingSchedule(100, warmup=0.2, b_range=(20, 2))
    assert all(s(it) is None for it in range(20))           # regulariser off during warm-up
    assert s(20) == 20                                      # right after: b_start
    assert s(100) == pytest.approx(2)                       # at the end: b_end
    assert s(60) == pytest.approx(11)                       # half way: the middle
    assert s(99) == pytest.approx(2 + 18 / 80)              # last iteration: one step from b_end
    betas = [s(it) for it in range(20, 101)]
    steps = [a - b for a, b in zip(betas, betas[1:])]
    assert all(d == pytest.approx(18 / 80) for d in steps)  # linear
    assert s(1000) == pytest.approx(2)                      # never below b_end


def test_schedule_without_warmup_and_other_range():
    s = RoundingSchedule(10, warmup=0, b_range=(8, 4))
    assert s(0) == 8 and isinstance(s(0), float)
    assert s(5) == pytest.approx(6)
    assert s(10) == pytest.approx(4)


def test_schedule_warmup_fraction_is_truncated():
    s = RoundingSchedule(7, warmup=0.5)  # start = int(3.5) = 3
    assert s(2) is None and s(3) == 20


# ---------------------------------------------------------------------------------------
# fisher_weight
# ---------------------------------------------------------------------------------------
def test_fisher_weight_modes_match_hand_formulas():
    g = _randn(4, 3, 2, 2)
    assert torch.equal(fisher_weight(g, 'raw'), g * g)
    torch.testing.assert_close(fisher_weight(g, 'abs_plus_one'), (g.abs() + 1) ** 2)
    mean_sq = float((g * g).mean())
    w = fisher_weight(g, 'normalized', mean_sq)
    torch.testing.assert_close(w, g * g / mean_sq)
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)  # MSE scale on average


def test_fisher_weight_values_by_hand():
    g = torch.tensor([-2.0, 0.0, 0.5])
    assert fisher_weight(g, 'raw').tolist() == [4.0, 0.0, 0.25]
    assert fisher_weight(g, 'abs_plus_one').tolist() == [9.0, 1.0, 2.25]
    assert fisher_weight(g, 'normalized', 2.0).tolist() == [2.0, 0.0, 0.125]


def test_fisher_weight_normalized_zero_gradient_stays_finite():
    w = fisher_weight(torch.zeros(3, 4), 'normalized', 0.0)
    assert torch.isfinite(w).all() and (w == 0).all()


def test_fisher_weight_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match=r'quant_cfg\.recon\.fisher_weight'):
        fisher_weight(torch.ones(2), 'squared')


# ---------------------------------------------------------------------------------------
# reconstruction_loss
# ---------------------------------------------------------------------------------------
def test_reconstruction_loss_sums_channels_averages_the_rest():
    out, target = _randn(5, 3, 4, 2, seed=1), _randn(5, 3, 4, 2, seed=2)
    err = (out - target) ** 2
    expect = err.sum(1).mean()
    torch.testing.assert_close(reconstruction_loss(out, target), expect)
    # i.e. C times the plain mean
    torch.testing.assert_close(reconstruction_loss(out, target), 3 * err.mean())
    # by hand, loop over the non-channel positions
    total = sum(float(err[n, :, h, w].sum()) for n in range(5) for h in range(4) for w in range(2))
    assert float(reconstruction_loss(out, target)) == pytest.approx(total / 40, rel=1e-5)


def test_reconstruction_loss_weighted_and_2d():
    out, target, w = _randn(6, 4, seed=1), _randn(6, 4, seed=2), _randn(6, 4, seed=3).abs()
    torch.testing.assert_close(reconstruction_loss(out, target, w), ((out - target) ** 2 * w).sum(1).mean())
    torch.testing.assert_close(reconstruction_loss(out, target), ((out - target) ** 2).sum(1).mean())


def test_reconstruction_loss_weight_of_ones_is_unweighted_and_1d_is_mean():
    out, target = _randn(2, 3, 4, 4, seed=4), _randn(2, 3, 4, 4, seed=5)
    torch.testing.assert_close(reconstruction_loss(out, target, torch.ones_like(out)),
                               reconstruction_loss(out, target))
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.zeros(3)
    assert float(reconstruction_loss(a, b)) == pytest.approx(7.0)
    assert float(reconstruction_loss(out, out)) == 0


def test_reconstruction_loss_gradient_flows_to_output_only():
    out = _randn(2, 3, 2, 2, seed=6).requires_grad_()
    target = _randn(2, 3, 2, 2, seed=7)
    reconstruction_loss(out, target).backward()
    # d/d out of sum_c(...)/ (N*H*W) = 2 (out - target) / (N*H*W)
    torch.testing.assert_close(out.grad, 2 * (out.detach() - target) / 8)


# ---------------------------------------------------------------------------------------
# recon_config
# ---------------------------------------------------------------------------------------
def test_recon_config_defaults_and_merge():
    cfg = recon_config()
    assert cfg == DEFAULT_RECON and cfg is not DEFAULT_RECON
    cfg = recon_config(dict(iters=5, loss='mse'))
    assert cfg['iters'] == 5 and cfg['loss'] == 'mse' and cfg['batch_size'] == DEFAULT_RECON['batch_size']
    assert recon_config(None) == DEFAULT_RECON


def test_recon_config_does_not_share_state_with_defaults_or_input():
    before = copy.deepcopy(DEFAULT_RECON)
    user = dict(cache=dict(host_gb=1), task_loss=dict(type='ClassificationKL'))
    cfg = recon_config(user)
    cfg['task_loss']['type'] = 'Changed'
    cfg['cache']['host_gb'] = 99
    cfg['b_range'] = (1, 1)
    assert DEFAULT_RECON == before
    assert user == dict(cache=dict(host_gb=1), task_loss=dict(type='ClassificationKL'))


def test_recon_config_unknown_key_is_named():
    with pytest.raises(ValueError, match='iterations'):
        recon_config(dict(iterations=10))


@pytest.mark.parametrize('key,value', [
    ('granularity', 'net'), ('act_mode', 'alternate'), ('loss', 'kl'), ('fisher_weight', 'squared'),
    ('input_mix', 'mixed'), ('on_nan', 'skip'), ('iters', 0), ('iters', 2.5), ('iters', '100'),
    ('batch_size', -1), ('warmup', 1.0), ('warmup', -0.1), ('qdrop_prob', 0), ('qdrop_prob', 1.5),
])
def test_recon_config_bad_value_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf'quant_cfg\.recon\.{key}'):
        recon_config({key: value})


@pytest.mark.parametrize('key,value', [('warmup', 0), ('qdrop_prob', 1), ('iters', 1), ('batch_size', 1),
                                       ('fisher_weight', 'abs_plus_one'), ('input_mix', 'qdrop')])
def test_recon_config_boundary_values_are_accepted(key, value):
    assert recon_config({key: value})[key] == value


# ---------------------------------------------------------------------------------------
# ClassificationKL
# ---------------------------------------------------------------------------------------
def _kl_by_hand(q, fp):
    p = torch.softmax(fp, dim=1)
    return (p * (torch.log(p) - torch.log_softmax(q, dim=1))).sum()


def test_classification_kl_is_registered_and_matches_torch():
    loss = TASK_LOSSES.build(dict(type='ClassificationKL'))
    assert isinstance(loss, ClassificationKL)
    q, fp = _randn(4, 10, seed=1), _randn(4, 10, seed=2)
    expect = F.kl_div(torch.log_softmax(q, 1), torch.softmax(fp, 1), reduction='sum')
    torch.testing.assert_close(loss(q, fp), expect)
    torch.testing.assert_close(loss(q, fp), _kl_by_hand(q, fp))
    assert float(loss(q, fp)) > 0
    # direction: KL(p_fp || p_q), not the reverse
    assert float(loss(q, fp)) != pytest.approx(float(_kl_by_hand(fp, q)), rel=1e-3)


def test_classification_kl_zero_when_equal_and_shift_invariant():
    x = _randn(3, 7, seed=3)
    assert float(ClassificationKL()(x, x.clone())) == pytest.approx(0, abs=1e-6)
    assert float(ClassificationKL()(x + 5.0, x)) == pytest.approx(0, abs=1e-5)  # softmax invariance


def test_classification_kl_sums_over_samples_and_takes_tuple_outputs():
    q, fp = _randn(4, 5, seed=4), _randn(4, 5, seed=5)
    loss = ClassificationKL()
    per_sample = sum(loss(q[i:i + 1], fp[i:i + 1]) for i in range(4))
    torch.testing.assert_close(loss(q, fp), per_sample)
    torch.testing.assert_close(loss((q, q * 3), (fp, fp * 0)), loss(q, fp))   # first item only
    torch.testing.assert_close(loss([q], [fp]), loss(q, fp))


def test_classification_kl_gradient():
    q, fp = _randn(3, 6, seed=6, dtype=torch.float64), _randn(3, 6, seed=7, dtype=torch.float64)
    q.requires_grad_(True)
    loss = ClassificationKL()
    (g, ) = torch.autograd.grad(loss(q, fp), q)
    # analytic: softmax(q) - softmax(fp), per sample (sum reduction)
    torch.testing.assert_close(g, torch.softmax(q.detach(), 1) - torch.softmax(fp, 1))
    # and finite differences
    assert torch.autograd.gradcheck(lambda t: loss(t, fp), (q, ), eps=1e-6, atol=1e-5)
    # zero gradient when the quantized output equals the float one
    z = fp.clone().requires_grad_(True)
    (gz, ) = torch.autograd.grad(loss(z, fp), z)
    assert float(gz.abs().max()) < 1e-12


def test_classification_kl_float32_gradient_vs_central_differences():
    q, fp = _randn(2, 4, seed=8), _randn(2, 4, seed=9)
    loss = ClassificationKL()
    qq = q.clone().requires_grad_(True)
    (g, ) = torch.autograd.grad(loss(qq, fp), qq)
    eps = 1e-2
    num = torch.zeros_like(q)
    for idx in range(q.numel()):
        d = torch.zeros(q.numel())
        d[idx] = eps
        d = d.view_as(q)
        num.view(-1)[idx] = (loss(q + d, fp) - loss(q - d, fp)) / (2 * eps)
    torch.testing.assert_close(g, num, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize('shape', [(4, 3, 5, 5), (6, 10)])
@pytest.mark.parametrize('weighted', [False, True])
def test_fused_reconstruction_loss_matches_naive_expression(shape, weighted):
    """The fused loss node equals ((out - y)^2 * w).sum(1).mean() in value and gradient."""
    torch.manual_seed(1)
    out0, y = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = torch.rand(shape, dtype=torch.float64) if weighted else None
    a = out0.clone().requires_grad_()
    naive = ((a - y).pow(2) * (w if weighted else 1)).sum(1).mean()
    naive.backward()
    b = out0.clone().requires_grad_()
    fused = reconstruction_loss(b, y, w)
    fused.backward()
    assert torch.allclose(naive, fused)
    assert torch.allclose(a.grad, b.grad)
