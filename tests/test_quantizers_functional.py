"""Gradient rules and grids of mmbrecq.quantizers.functional, checked against hand-computed values."""
import math

import pytest
import torch

from mmbrecq.quantizers.functional import fake_quant, lp_error, qparams_from_range, round_ste

from _reference import grad_scale


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------------------
# round_ste / grad_scale
# ---------------------------------------------------------------------------------------
def test_round_ste_forward_rounds_and_gradient_is_identity():
    x = _t([-2.7, -1.2, -0.4, 0.3, 0.6, 1.49, 2.51], torch.float64).requires_grad_()
    y = round_ste(x)
    assert torch.equal(y.detach(), _t([-3., -1., -0., 0., 1., 1., 3.], torch.float64))
    w = _t([1., 2., 3., 4., 5., 6., 7.], torch.float64)
    (y * w).sum().backward()
    # straight-through: dy/dx == 1, so the gradient is w itself (plain round would give 0)
    assert torch.equal(x.grad, w)


def test_round_ste_composes_with_chain_rule():
    x = _t([0.26, 1.74, -0.9]).requires_grad_()
    y = round_ste(3 * x) ** 2  # forward round(3x)^2, backward 2*round(3x)*3
    y.sum().backward()
    r = torch.round(3 * x.detach())
    assert torch.equal(y.detach(), r ** 2)
    assert torch.allclose(x.grad, 6 * r)


@pytest.mark.parametrize('scale', [0.5, 1e-3, 1 / math.sqrt(784 * 255), 3.0])
def test_grad_scale_forward_is_identity_and_gradient_is_scaled(scale):
    torch.manual_seed(0)
    x = (torch.rand(1000, dtype=torch.float64) * 4 - 2).requires_grad_()
    y = grad_scale(x, scale)
    # forward is the identity up to rounding of (x - x*s) + x*s
    assert torch.allclose(y.detach(), x.detach(), rtol=1e-12, atol=0)
    g = torch.randn(1000, dtype=torch.float64)
    y.backward(g)
    assert torch.allclose(x.grad, g * scale, rtol=1e-12, atol=0)


def test_grad_scale_on_broadcast_parameter_accumulates_scaled_gradient():
    s = torch.tensor(0.25, requires_grad=True)
    x = torch.arange(6.)
    (grad_scale(s, 0.1) * x).sum().backward()
    assert s.grad.item() == pytest.approx(0.1 * x.sum().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------
# fake_quant on hand-computed grids (power-of-two scales keep every product exact)
# ---------------------------------------------------------------------------------------
def _check_grid(x, scale, zp, qmin, qmax, expected_q):
    """``expected_q``: the clamped integers ``clamp(round(x/s) + z)`` written out by hand."""
    out = fake_quant(x, scale, zp, qmin, qmax)
    expected = (expected_q - zp) * scale
    assert out.shape == x.shape
    assert torch.equal(out, expected), (out, expected)


def test_fake_quant_asymmetric_2bit_per_tensor():
    # qmin=0, qmax=3, s=0.5, z=1: x/s = [-2, -1.2, -0.4, 0, 0.52, 1.48, 2, 4]
    x = _t([-1.0, -0.6, -0.2, 0.0, 0.26, 0.74, 1.0, 2.0])
    q = _t([0, 0, 1, 1, 2, 2, 3, 3])
    _check_grid(x, torch.tensor(0.5), torch.tensor(1.), 0, 3, q)
    # the dequantized values, also by hand
    assert torch.equal(fake_quant(x, torch.tensor(0.5), torch.tensor(1.), 0, 3),
                       _t([-0.5, -0.5, 0., 0., 0.5, 0.5, 1.0, 1.0]))


def test_fake_quant_asymmetric_8bit_per_tensor():
    # qmin=0, qmax=255, s=0.125, z=128: x/s = [-160, -128, -0.48, 0.56, 127, 128, 26.4]
    x = _t([-20.0, -16.0, -0.06, 0.07, 15.875, 16.0, 3.3])
    q = _t([0, 0, 128, 129, 255, 255, 154])
    _check_grid(x, torch.tensor(0.125), torch.tensor(128.), 0, 255, q)
    assert torch.equal(fake_quant(x, torch.tensor(0.125), torch.tensor(128.), 0, 255),
                       _t([-16., -16., 0., 0.125, 15.875, 15.875, 3.25]))


def test_fake_quant_symmetric_signed_4bit():
    # qmin=-8, qmax=7, s=0.25, z=0: x/s = [-12, -8.4, -1.2, 0.4, 3.6, 6.96, 8]
    x = _t([-3.0, -2.1, -0.3, 0.1, 0.9, 1.74, 2.0])
    q = _t([-8, -8, -1, 0, 4, 7, 7])
    _check_grid(x, torch.tensor(0.25), torch.tensor(0.), -8, 7, q)
    assert torch.equal(fake_quant(x, torch.tensor(0.25), torch.tensor(0.), -8, 7),
                       _t([-2., -2., -0.25, 0., 1., 1.75, 1.75]))


def test_fake_quant_symmetric_unsigned_8bit():
    # qmin=0, qmax=255, s=1/64, z=0: x/s = [-32, 0, 0.64, 64, 255.36, 288]
    x = _t([-0.5, 0.0, 0.01, 1.0, 3.99, 4.5])
    q = _t([0, 0, 1, 64, 255, 255])
    _check_grid(x, torch.tensor(1 / 64), torch.tensor(0.), 0, 255, q)
    assert torch.equal(fake_quant(x, torch.tensor(1 / 64), torch.tensor(0.), 0, 255),
                       _t([0., 0., 0.015625, 1., 3.984375, 3.984375]))


def test_fake_quant_per_channel_axis0_broadcast():
    # weight-like (C=2, 2, 3), 4-bit asymmetric, scale/zp shaped (2, 1, 1)
    x = _t([[[-3.0, -1.9, -0.2], [0.3, 2.6, 6.0]],     # ch0: s=0.5,  z=4
            [[-3.0, -2.4, -0.1], [0.2, 1.2, 2.0]]])    # ch1: s=0.25, z=10
    scale = _t([0.5, 0.25]).view(2, 1, 1)
    zp = _t([4., 10.]).view(2, 1, 1)
    # ch0: x/s = [-6, -3.8, -0.4, 0.6, 5.2, 12] -> +4 -> [-2, 0, 4, 5, 9, 16] -> clamp
    # ch1: x/s = [-12, -9.6, -0.4, 0.8, 4.8, 8] -> +10 -> [-2, 0, 10, 11, 15, 18] -> clamp
    q = _t([[[0, 0, 4], [5, 9, 15]],
            [[0, 0, 10], [11, 15, 15]]])
    _check_grid(x, scale, zp, 0, 15, q)
    out = fake_quant(x, scale, zp, 0, 15)
    assert torch.equal(out[0].flatten(), _t([-2., -2., 0., 0.5, 2.5, 5.5]))
    assert torch.equal(out[1].flatten(), _t([-2.5, -2.5, 0., 0.25, 1.25, 1.25]))


def test_fake_quant_per_channel_axis1_broadcast_2bit_signed():
    # activation-like (N=2, C=3, 2), symmetric signed 2-bit grid [-2, 1], scale (1, 3, 1)
    x = _t([[[-2.0, 0.2], [0.6, -0.4], [0.3, -0.1]],
            [[0.8, -0.7], [1.7, -3.0], [-0.45, 0.05]]])
    scale = _t([0.5, 1.0, 0.25]).view(1, 3, 1)
    zp = torch.zeros(1, 3, 1)
    q = _t([[[-2, 0], [1, 0], [1, 0]],
            [[1, -1], [1, -2], [-2, 0]]])
    _check_grid(x, scale, zp, -2, 1, q)


def test_fake_quant_per_channel_differs_from_wrong_axis():
    # guards the broadcasting itself: the same scales on the wrong axis give another result
    torch.manual_seed(0)
    x = torch.randn(3, 3) * 4
    s = _t([0.25, 1.0, 4.0])
    z = torch.zeros(3)
    by_row = fake_quant(x, s.view(3, 1), z.view(3, 1), -8, 7)
    by_col = fake_quant(x, s.view(1, 3), z.view(1, 3), -8, 7)
    for c in range(3):
        assert torch.equal(by_row[c], fake_quant(x[c], s[c], z[c], -8, 7))
        assert torch.equal(by_col[:, c], fake_quant(x[:, c], s[c], z[c], -8, 7))
    assert not torch.equal(by_row, by_col)


# ---------------------------------------------------------------------------------------
# gradients of fake_quant: STE for x, LSQ for the step size
# ---------------------------------------------------------------------------------------
def _lsq_expected(x, s, z, qmin, qmax):
    v = x / s
    q = torch.round(v) + z
    inside = torch.round(v) - v
    return torch.where(q < qmin, torch.full_like(v, qmin) - z,
                       torch.where(q > qmax, torch.full_like(v, qmax) - z, inside))


@pytest.mark.parametrize('qmin,qmax,z', [(0, 15, 3.), (-8, 7, 0.), (0, 3, 1.), (0, 255, 100.)])
def test_fake_quant_lsq_step_gradient_elementwise(qmin, qmax, z):
    torch.manual_seed(1)
    s0 = 0.37
    x = (torch.randn(2000, dtype=torch.float64) * (qmax - qmin) * s0 * 0.5).requires_grad_()
    scale = torch.full_like(x, s0).requires_grad_()  # one step per element: per-element grads
    zp = torch.full_like(x, z)
    fake_quant(x, scale, zp, qmin, qmax).sum().backward()
    expected = _lsq_expected(x.detach(), s0, z, qmin, qmax)
    assert torch.allclose(scale.grad, expected, atol=1e-12)
    # every regime is exercised
    q = torch.round(x.detach() / s0) + z
    assert (q < qmin).any() and (q > qmax).any() and ((q >= qmin) & (q <= qmax)).any()
    # STE to x: 1 inside the grid, 0 where clamped
    inside = ((q >= qmin) & (q <= qmax)).double()
    assert torch.equal(x.grad, inside)


def test_fake_quant_lsq_step_gradient_per_channel_sums_over_channel():
    torch.manual_seed(2)
    x = torch.randn(4, 50, dtype=torch.float64) * 3
    s = torch.tensor([0.1, 0.3, 0.5, 1.0], dtype=torch.float64).requires_grad_()
    z = torch.tensor([8., 2., 0., 15.], dtype=torch.float64)
    fake_quant(x, s.view(4, 1), z.view(4, 1), 0, 15).sum().backward()
    expected = torch.stack([_lsq_expected(x[c], s[c].item(), z[c].item(), 0, 15).sum() for c in range(4)])
    assert torch.allclose(s.grad, expected, atol=1e-10)


def test_fake_quant_step_gradient_matches_finite_differences_where_valid():
    """Central differences of fake_quant in s.

    Outside the grid the output is ``(qmax - z) * s`` (or qmin), so the true derivative is the
    LSQ value itself. Inside, the integer is locally constant, so the true derivative is
    ``round(x/s)`` and LSQ adds the straight-through term ``-x/s``: LSQ == FD - x/s.
    """
    torch.manual_seed(3)
    qmin, qmax, z, s0, eps = 0, 15, 4., 0.3, 1e-7
    x = torch.randn(3000, dtype=torch.float64) * 4
    v = x / s0
    # keep points whose rounding cannot change within +-eps (away from half-integers)
    frac = (v - torch.floor(v) - 0.5).abs()
    x = x[frac > 1e-3]
    v = x / s0
    s = torch.full_like(x, s0).requires_grad_()
    fake_quant(x, s, torch.full_like(x, z), qmin, qmax).sum().backward()
    fd = (fake_quant(x, torch.full_like(x, s0 + eps), torch.full_like(x, z), qmin, qmax) -
          fake_quant(x, torch.full_like(x, s0 - eps), torch.full_like(x, z), qmin, qmax)) / (2 * eps)
    q = torch.round(v) + z
    below, above = q < qmin, q > qmax
    inside = ~(below | above)
    assert below.sum() > 10 and above.sum() > 10 and inside.sum() > 100
    assert torch.allclose(s.grad[below], fd[below], atol=1e-6)
    assert torch.allclose(s.grad[above], fd[above], atol=1e-6)
    assert torch.allclose(fd[below], torch.full_like(fd[below], qmin - z), atol=1e-6)
    assert torch.allclose(fd[above], torch.full_like(fd[above], qmax - z), atol=1e-6)
    assert torch.allclose(fd[inside], torch.round(v[inside]), atol=1e-5)
    assert torch.allclose(s.grad[inside], fd[inside] - v[inside], atol=1e-5)


# ---------------------------------------------------------------------------------------
# qparams_from_range
# ---------------------------------------------------------------------------------------
GRIDS = [  # (bits, symmetric, signed) -> (qmin, qmax)
    (2, False, True), (4, False, True), (8, False, True),
    (2, True, True), (4, True, True), (8, True, True),
    (2, True, False), (4, True, False), (8, True, False),
]


def _grid(bits, symmetric, signed):
    if symmetric and signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@pytest.mark.parametrize('bits,symmetric,signed', GRIDS)
def test_qparams_zero_exactly_representable(bits, symmetric, signed):
    torch.manual_seed(bits + 10 * symmetric + 100 * signed)
    qmin, qmax = _grid(bits, symmetric, signed)
    a, b = torch.randn(500) * 3, torch.randn(500) * 3
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)  # includes all-positive and all-negative ranges
    assert ((lo > 0).any() and (hi < 0).any())
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric)
    assert scale.shape == lo.shape and zp.shape == lo.shape
    assert (scale > 0).all()
    assert torch.equal(zp, torch.round(zp)) and (zp >= qmin).all() and (zp <= qmax).all()
    zeros = torch.zeros_like(lo)
    assert torch.equal(fake_quant(zeros, scale, zp, qmin, qmax), zeros)
    if symmetric:
        assert torch.equal(zp, torch.zeros_like(zp))


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_qparams_asymmetric_covers_widened_range(bits):
    torch.manual_seed(bits)
    qmin, qmax = 0, (1 << bits) - 1
    a, b = torch.randn(300, dtype=torch.float64) * 2, torch.randn(300, dtype=torch.float64) * 2
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=False)
    lo_w, hi_w = lo.clamp(max=0), hi.clamp(min=0)
    assert torch.allclose(scale * (qmax - qmin), hi_w - lo_w)
    # both ends of the widened range quantize to within half a step (zero point is rounded)
    for end in (lo_w, hi_w):
        err = (fake_quant(end, scale, zp, qmin, qmax) - end).abs()
        assert (err <= 0.5 * scale + 1e-12).all()


def test_qparams_hand_computed():
    # asymmetric 2-bit [-1, 2]: s = 3/3 = 1, z = 0 - round(-1) = 1
    s, z = qparams_from_range(_t(-1.), _t(2.), 0, 3, False)
    assert s.item() == 1.0 and z.item() == 1.0
    # asymmetric 2-bit [0.5, 2] widens to [0, 2]: s = 2/3, z = 0
    s, z = qparams_from_range(_t(0.5), _t(2.), 0, 3, False)
    assert s.item() == pytest.approx(2 / 3) and z.item() == 0.0
    # asymmetric 2-bit [-4, -1] widens to [-4, 0]: s = 4/3, z = -round(-3) = 3
    s, z = qparams_from_range(_t(-4.), _t(-1.), 0, 3, False)
    assert s.item() == pytest.approx(4 / 3) and z.item() == 3.0
    # asymmetric 8-bit [-1, 3]: s = 4/255, z = round(63.75) = 64
    s, z = qparams_from_range(_t(-1.), _t(3.), 0, 255, False)
    assert s.item() == pytest.approx(4 / 255) and z.item() == 64.0
    # symmetric signed 4-bit [-3, 1.5]: s = max(3, 1.5)/7
    s, z = qparams_from_range(_t(-3.), _t(1.5), -8, 7, True)
    assert s.item() == pytest.approx(3 / 7) and z.item() == 0.0
    # symmetric signed 4-bit [-1, 3.5]: s = 3.5/7 = 0.5
    s, z = qparams_from_range(_t(-1.), _t(3.5), -8, 7, True)
    assert s.item() == 0.5 and z.item() == 0.0
    # symmetric unsigned 8-bit [-3, 5.1]: s = 5.1/255 = 0.02 (negative side ignored)
    s, z = qparams_from_range(_t(-3.), _t(5.1), 0, 255, True)
    assert s.item() == pytest.approx(0.02) and z.item() == 0.0
    # per-channel tensors are handled element-wise
    s, z = qparams_from_range(_t([-1., -4.]), _t([2., -1.]), 0, 3, False)
    assert torch.allclose(s, _t([1., 4 / 3])) and torch.equal(z, _t([1., 3.]))


@pytest.mark.parametrize('symmetric,qmin,qmax', [(False, 0, 15), (True, -8, 7), (True, 0, 15)])
def test_qparams_degenerate_zero_range_is_finite(symmetric, qmin, qmax):
    s, z = qparams_from_range(torch.zeros(3), torch.zeros(3), qmin, qmax, symmetric)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(z).all()
    out = fake_quant(torch.zeros(3), s, z, qmin, qmax)
    assert torch.equal(out, torch.zeros(3))


def test_lp_error_sum_and_dim():
    x = _t([[1., 2.], [3., 5.]])
    y = _t([[0., 0.], [3., 3.]])
    p = 2.4
    assert lp_error(x, y, p).item() == pytest.approx(1 + 2 ** p + 2 ** p)
    assert torch.allclose(lp_error(x, y, p, dim=1), _t([1 + 2 ** p, 2 ** p]))


@pytest.mark.parametrize('per_channel', [False, True])
def test_fused_lsq_equals_composed_fake_quant(per_channel):
    """The fused LSQ node gives the composed expression's values and both gradients."""
    from mmbrecq.quantizers.functional import fake_quant_lsq
    torch.manual_seed(3)
    x0 = torch.randn(4, 3, 5, 5) * 3
    s0 = torch.tensor([0.3, 0.2, 0.5]).view(1, 3, 1, 1) if per_channel else torch.tensor(0.3)
    z = torch.full_like(s0, 7.0)
    g = torch.randn(4, 3, 5, 5)
    outs = []
    for fused in (False, True):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        y = fake_quant_lsq(x, s, z, 0, 15, 0.1) if fused else fake_quant(x, grad_scale(s, 0.1), z, 0, 15)
        y.backward(g)
        outs.append((y.detach(), x.grad, s.grad))
    (y1, gx1, gs1), (y2, gx2, gs2) = outs
    assert torch.equal(y1, y2)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-7)  # composed: g * s / s
    assert torch.allclose(gs1, gs2, rtol=1e-5, atol=1e-6)
    assert gs1.abs().sum() > 0
