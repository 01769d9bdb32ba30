"""AdaRoundQuantizer: soft/hard rounding, regulariser, gradients, export and state."""
import io
import math

import pytest
import torch

from mmbrecq.quantizers import AdaRoundQuantizer

ZETA, GAMMA = 1.1, -0.1


def _alpha_for(h):
    """alpha with h(alpha) == h for 0 < h < 1 (inverse of the rectified sigmoid)."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return math.log(p / (1 - p))


def _make(w, bits=4, init='minmax', symmetric=False, **kwargs):
    q = AdaRoundQuantizer(bits=bits, weight_shape=w.shape, num_channels=w.shape[0], ch_axis=0,
                          init=init, symmetric=symmetric, num_candidates=20, **kwargs)
    q.init_range(w)
    return q


def _sz(q, w):
    shape = (-1, ) + (1, ) * (w.dim() - 1)
    return q.scale.detach().view(shape), q.zero_point.view(shape)


def test_needs_weight_shape_and_starts_nearest():
    with pytest.raises(ValueError, match='weight_shape'):
        AdaRoundQuantizer(bits=4)
    q = AdaRoundQuantizer(bits=4, weight_shape=(3, 2), num_channels=3)
    assert q.rounding == 'nearest' and q.alpha.shape == (3, 2) and not q.alpha.requires_grad


def test_invalid_mode_raises_and_keeps_mode():
    q = AdaRoundQuantizer(bits=4, weight_shape=(3, 2), num_channels=3)
    with pytest.raises(ValueError, match="rounding='up'"):
        q.set_rounding('up')
    assert q.rounding == 'nearest'


def test_entering_soft_needs_weight():
    w = torch.randn(3, 4)
    q = _make(w)
    with pytest.raises(ValueError, match='float weight'):
        q.set_rounding('soft')
    assert q.rounding == 'nearest'


# ---------------------------------------------------------------------------------------
# soft rounding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits,symmetric', [(4, False), (2, False), (3, True), (8, True)])
def test_soft_value_at_init_equals_float_weight(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(8, 4, 3, 3) * torch.rand(8, 1, 1, 1)
    q = _make(w, bits=bits, symmetric=symmetric)
    nearest = q(w)
    q.set_rounding('soft', w)
    soft = q(w)
    s, z = _sz(q, w)
    v = w / s + z
    inside = (v >= q.qmin) & (v <= q.qmax)
    # min-max: all weights are inside the grid but for half a step at one end (rounded zero point)
    assert inside.float().mean() > 0.8
    assert ((v >= q.qmin - 0.5) & (v <= q.qmax + 0.5)).all()
    atol = (2e-5 * s).expand_as(w)
    assert torch.allclose(soft[inside], w[inside], rtol=0, atol=atol.max().item())
    assert ((soft[inside] - w[inside]).abs() <= atol[inside]).all()
    # outside the grid the soft value is clamped like the nearest one
    assert torch.allclose(soft[~inside], nearest[~inside], atol=1e-6)
    # and it is not the nearest-rounded weight (otherwise the test is vacuous)
    assert (soft - nearest).abs().max() > 0.1 * s.min()


def test_soft_h_at_init_is_fractional_part():
    torch.manual_seed(0)
    w = torch.randn(4, 10)
    q = _make(w)
    q.set_rounding('soft', w)
    s, _ = _sz(q, w)
    frac = w / s - torch.floor(w / s)
    assert torch.allclose(q.h(), frac, atol=2e-6)
    assert (q.h() >= 0).all() and (q.h() <= 1).all()


# ---------------------------------------------------------------------------------------
# hard rounding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_hard_rounding_is_floor_or_ceil_by_sign_of_alpha(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 5, 3, 3)
    q = _make(w, bits=bits)
    q.set_rounding('soft', w)
    with torch.no_grad():
        q.alpha.copy_(torch.randn_like(q.alpha) * 3)
    q.set_rounding('hard')
    out = q(w)
    s, z = _sz(q, w)
    ints = q.integer_repr(w)
    fl = torch.floor(w / s)
    lo_int = torch.clamp(fl + z, q.qmin, q.qmax)
    hi_int = torch.clamp(fl + 1 + z, q.qmin, q.qmax)
    assert ((ints == lo_int) | (ints == hi_int)).all()
    up = q.alpha.detach() >= 0
    assert torch.equal(ints, torch.where(up, hi_int, lo_int))
    # both directions occur, and away from the clamp they are really floor and ceil of w/s
    free = (fl + z > q.qmin) & (fl + 1 + z < q.qmax)
    assert (up & free).any() and (~up & free).any()
    k = out / s
    assert torch.allclose(k[free & up], fl[free & up] + 1, atol=1e-4)
    assert torch.allclose(k[free & ~up], fl[free & ~up], atol=1e-4)


def test_set_rounding_hard_after_optimisation_like_alpha():
    torch.manual_seed(7)
    w = torch.randn(8, 16)
    q = _make(w, bits=4)
    q.set_rounding('soft', w)
    target = torch.randn_like(w) * 0.05 + w
    for _ in range(5):  # a few sign-gradient steps: reconstruction + regulariser
        q.alpha.grad = None
        loss = (q(w) - target).pow(2).sum() + 0.01 * q.round_loss(beta=10)
        loss.backward()
        with torch.no_grad():
            q.alpha.sub_(0.5 * q.alpha.grad.sign())
    soft = q(w).detach()
    alpha = q.alpha.detach().clone()
    q.set_rounding('hard')
    assert q.rounding == 'hard' and not q.alpha.requires_grad
    assert torch.equal(q.alpha, alpha)  # switching does not touch alpha
    hard = q(w)
    assert not hard.requires_grad
    s, z = _sz(q, w)
    # hard rounds the soft offset h to 0/1: at most half a step from the soft weight
    assert ((hard - soft).abs() <= 0.5 * s + 1e-6).all()
    k = hard / s + z
    assert torch.allclose(k, torch.round(k), atol=1e-4)
    # back to soft: alpha is kept (not re-initialised from w), gradient re-enabled
    q.set_rounding('soft', w)
    assert torch.equal(q.alpha, alpha) and q.alpha.requires_grad
    assert torch.allclose(q(w), soft)


# ---------------------------------------------------------------------------------------
# regulariser
# ---------------------------------------------------------------------------------------
def _quantizer_with_h(values):
    q = AdaRoundQuantizer(bits=4, weight_shape=(len(values), ), num_channels=None)
    alpha = [20. if h == 1 else -20. if h == 0 else _alpha_for(h) for h in values]
    with torch.no_grad():
        q.alpha.copy_(torch.tensor(alpha))
    return q


def test_round_loss_at_beta_endpoints_hand_computed():
    hs = [0.0, 1.0, 0.5, 0.75, 0.9, 0.2]
    q = _quantizer_with_h(hs)
    assert torch.allclose(q.h(), torch.tensor(hs), atol=1e-6)
    # beta = 2: 1 - (2h-1)^2 = 0, 0, 1, 0.75, 0.36, 0.64
    assert q.round_loss(2).item() == pytest.approx(0 + 0 + 1 + 0.75 + 0.36 + 0.64, abs=1e-5)
    # beta = 20: 0, 0, 1, 1 - 0.5**20, 1 - 0.8**20, 1 - 0.6**20
    expected20 = 1 + (1 - 0.5 ** 20) + (1 - 0.8 ** 20) + (1 - 0.6 ** 20)
    assert expected20 == pytest.approx(3.988433269, abs=1e-8)
    assert q.round_loss(20).item() == pytest.approx(expected20, abs=1e-5)


def test_round_loss_gradient_pushes_h_away_from_half():
    q = _quantizer_with_h([0.3, 0.7])
    q.alpha.requires_grad_(True)
    q.round_loss(2).backward()
    assert q.alpha.grad[0] > 0 and q.alpha.grad[1] < 0  # descent lowers h=0.3, raises h=0.7


# ---------------------------------------------------------------------------------------
# gradients per mode
# ---------------------------------------------------------------------------------------
def test_alpha_gets_gradient_only_in_soft_mode():
    torch.manual_seed(8)
    w0 = torch.randn(4, 6)
    q = _make(w0)
    # nearest: plain STE fake quantization, alpha unused
    w = w0.clone().requires_grad_()
    q(w).sum().backward()
    assert q.alpha.grad is None and not q.alpha.requires_grad
    assert w.grad is not None  # straight-through to the weight
    # soft: alpha is trained, the weight is frozen
    q.set_rounding('soft', w0)
    w = w0.clone().requires_grad_()
    (q(w) * torch.randn_like(w0)).sum().backward()
    assert q.alpha.requires_grad and q.alpha.grad is not None
    s, z = _sz(q, w0)
    v = torch.floor(w0 / s) + q.h().detach() + z
    on_grid = (v > q.qmin) & (v < q.qmax)  # where the outer clamp is active no gradient passes
    assert on_grid.float().mean() > 0.7
    assert (q.alpha.grad[on_grid] != 0).all() and (q.alpha.grad[~on_grid] == 0).all()
    assert w.grad is None
    # hard: no gradient path to alpha at all
    q.alpha.grad = None
    q.set_rounding('hard')
    out = q(w0)
    assert not q.alpha.requires_grad and not out.requires_grad


def test_soft_gradient_matches_rectified_sigmoid_derivative():
    torch.manual_seed(9)
    w = torch.randn(3, 5)
    q = _make(w)
    q.set_rounding('soft', w)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha))
    g = torch.randn(3, 5)
    q(w).backward(g)
    s, z = _sz(q, w)
    sig = torch.sigmoid(q.alpha.detach())
    h_unclamped = sig * (ZETA - GAMMA) + GAMMA
    v = torch.floor(w / s) + h_unclamped.clamp(0, 1) + z
    passes = (h_unclamped > 0) & (h_unclamped < 1) & (v >= q.qmin) & (v <= q.qmax)
    assert passes.float().mean() > 0.7
    dh = torch.where(passes, sig * (1 - sig) * (ZETA - GAMMA), torch.zeros_like(sig))
    assert torch.allclose(q.alpha.grad, g * s * dh, atol=1e-6)


# ---------------------------------------------------------------------------------------
# export and state
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['nearest', 'hard'])
def test_integer_repr_consistent_with_forward(mode):
    torch.manual_seed(10)
    w = torch.randn(5, 3, 3, 3)
    q = _make(w, init='lp')
    if mode == 'hard':
        q.set_rounding('soft', w)
        with torch.no_grad():
            q.alpha.copy_(torch.randn_like(q.alpha))
        q.set_rounding('hard')
    ints = q.integer_repr(w)
    assert torch.equal(ints, torch.round(ints))
    assert ints.min() >= q.qmin and ints.max() <= q.qmax
    s, z = _sz(q, w)
    assert torch.equal((ints - z) * s, q(w))


def test_integer_repr_in_soft_mode_is_the_hard_decision():
    torch.manual_seed(11)
    w = torch.randn(4, 8)
    q = _make(w)
    q.set_rounding('soft', w)
    with torch.no_grad():
        a = torch.randn_like(q.alpha)
        q.alpha.copy_(torch.where(a.abs() < 1e-3, torch.full_like(a, 0.5), a))  # avoid alpha == 0
    soft_ints = q.integer_repr(w)
    q.set_rounding('hard')
    assert torch.equal(soft_ints, q.integer_repr(w))


def _bytes_roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize('mode', ['nearest', 'soft', 'hard'])
def test_state_dict_round_trip_bit_exact(mode):
    torch.manual_seed(12)
    w = torch.randn(6, 4, 3, 3)
    q1 = _make(w, init='lp')
    if mode != 'nearest':
        q1.set_rounding('soft', w)
        with torch.no_grad():
            q1.alpha.add_(torch.randn_like(q1.alpha))
        q1.set_rounding(mode)
    sd = q1.state_dict()
    assert sd['_extra_state'] == {'initialized': True, 'bits': 4, 'rounding': mode, 'grid': (q1.qmin, q1.qmax)}
    q2 = AdaRoundQuantizer(bits=4, weight_shape=w.shape, num_channels=6, ch_axis=0, init='lp',
                           num_candidates=20)
    q2.load_state_dict(_bytes_roundtrip(sd))
    assert q2.rounding == mode and q2.initialized
    for name in ('scale', 'zero_point', 'alpha'):
        assert torch.equal(getattr(q2, name), getattr(q1, name)), name
    assert torch.equal(q2(w), q1(w))
    assert torch.equal(q2.integer_repr(w), q1.integer_repr(w))


def test_loading_mismatched_bits_raises():
    w = torch.randn(3, 4)
    q = _make(w, bits=4)
    q2 = AdaRoundQuantizer(bits=3, weight_shape=w.shape, num_channels=3)
    with pytest.raises(ValueError, match='4-bit'):
        q2.load_state_dict(q.state_dict())


def test_loaded_soft_state_keeps_alpha_trainable():
    w = torch.randn(3, 4)
    q1 = _make(w)
    q1.set_rounding('soft', w)
    q2 = AdaRoundQuantizer(bits=4, weight_shape=w.shape, num_channels=3, ch_axis=0, init='minmax')
    q2.load_state_dict(q1.state_dict())
    assert q2.rounding == 'soft'
    assert q2.alpha.requires_grad == q1.alpha.requires_grad
