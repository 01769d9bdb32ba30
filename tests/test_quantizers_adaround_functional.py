"""The one-node soft weight and rounding loss equal AdaRound's formulas written as
compositions (values bit for bit, gradients to float rounding), clamps included."""
import pytest
import torch

from mmbrecq.quantizers.adaround_functional import rectified_sigmoid, rounding_loss, soft_weight

ZETA, GAMMA = 1.1, -0.1


def _h(alpha):
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _soft_ref(alpha, w, s, z, qmin, qmax):
    return (torch.clamp(torch.floor(w / s) + _h(alpha) + z, qmin, qmax) - z) * s


def _setup(seed, shape=(16, 8, 3, 3), qmin=0, qmax=15, zp=7.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    grid_shape = (shape[0], ) + (1, ) * (len(shape) - 1)
    s = torch.rand(grid_shape, generator=g) * 0.2 + 0.05
    z = torch.full(grid_shape, zp)
    alpha = (torch.randn(shape, generator=g) * 4).requires_grad_(True)  # both clamps of h active
    return alpha, w, s, z, qmin, qmax


@pytest.mark.parametrize('qmin,qmax,zp', [(0, 15, 7.0), (-8, 7, 0.0), (0, 3, 1.0)])
def test_soft_weight_matches_the_composition(qmin, qmax, zp):
    alpha, w, s, z, qmin, qmax = _setup(0, qmin=qmin, qmax=qmax, zp=zp)
    assert ((torch.floor(w / s) + z) < qmin).any() and ((torch.floor(w / s) + z) > qmax).any()  # grid clamps
    probe = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    ref = _soft_ref(alpha, w, s, z, qmin, qmax)
    g_ref, = torch.autograd.grad((ref * probe).sum(), alpha)
    out = soft_weight(alpha, w, s, z, qmin, qmax, ZETA, GAMMA)
    g, = torch.autograd.grad((out * probe).sum(), alpha)
    assert torch.equal(out, ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert (g == 0).any() and (g != 0).any()  # zero exactly where a clamp is active


@pytest.mark.parametrize('beta', [2.0, 7.5, 20.0])
def test_rounding_loss_matches_the_composition(beta):
    alpha, *_ = _setup(2)
    ref = (1 - (2 * _h(alpha) - 1).abs().pow(beta)).sum()
    g_ref, = torch.autograd.grad(ref, alpha)
    loss = rounding_loss(alpha, ZETA, GAMMA, beta)
    g, = torch.autograd.grad(loss, alpha)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_rectified_sigmoid_derivative_is_zero_where_clamped():
    alpha = torch.tensor([-30., -2.5, 0., 2.5, 30.], requires_grad=True)
    h, dh = rectified_sigmoid(alpha.detach(), ZETA, GAMMA)
    torch.testing.assert_close(h, _h(alpha).detach())
    g, = torch.autograd.grad(_h(alpha).sum(), alpha)
    torch.testing.assert_close(dh, g)
    assert dh[0] == 0 and dh[-1] == 0 and dh[2] > 0


def test_no_gradient_to_the_weight_or_the_grid():
    alpha, w, s, z, qmin, qmax = _setup(3)
    w.requires_grad_(True)
    s.requires_grad_(True)
    out = soft_weight(alpha, w, s, z, qmin, qmax, ZETA, GAMMA)
    out.sum().backward()
    assert w.grad is None and s.grad is None and alpha.grad is not None


@pytest.mark.parametrize('per_tensor', [False, True])
def test_cpu_kernel_and_torch_code_agree(per_tensor, monkeypatch):
    from mmbrecq.ops import cpu_kernels
    if not cpu_kernels.cpu_kernels_available():
        pytest.skip(f'fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}')
    calls = []
    for fn in ('adaround_soft_forward', 'adaround_rounding_loss'):  # count the kernel runs
        real = getattr(cpu_kernels, fn)
        monkeypatch.setattr(cpu_kernels, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))
    alpha, w, s, z, qmin, qmax = _setup(4, shape=(6, 40001))  # several parallel blocks, odd tails
    if per_tensor:
        s, z = s[:1].reshape(()), z[:1].reshape(())
    probe = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    results = []
    for off in (False, True):
        with cpu_kernels.disabled() if off else torch.enable_grad():
            out = soft_weight(alpha, w, s, z, qmin, qmax, ZETA, GAMMA)
            g_w, = torch.autograd.grad((out * probe).sum(), alpha)
            loss = rounding_loss(alpha, ZETA, GAMMA, 9.5)
            g_r, = torch.autograd.grad(loss, alpha)
        results.append((out, g_w, loss, g_r))
    assert calls == ['adaround_soft_forward', 'adaround_rounding_loss']  # kernels in run 1 only
    (out_k, gw_k, loss_k, gr_k), (out_t, gw_t, loss_t, gr_t) = results
    assert torch.equal(out_k, out_t)
    torch.testing.assert_close(gw_k, gw_t, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(gr_k, gr_t, rtol=1e-5, atol=1e-7)
    assert (gr_k != 0).any() and (gw_k == 0).any()


def test_cpu_kernel_refuses_a_grid_along_another_axis():
    from mmbrecq.ops import cpu_kernels
    alpha, w, *_ = _setup(6, shape=(4, 5))
    assert cpu_kernels.adaround_channels(alpha, w, torch.ones(1, 5), torch.zeros(1, 5)) is None
    from mmbrecq.ops import dispatch
    assert dispatch.select('adaround_soft', alpha.double(), w.double(), ints=(0, 15), contiguous=(alpha, )) is None


def test_second_backward_through_the_same_graph_fails_loudly():
    alpha, w, s, z, qmin, qmax = _setup(7)
    out = soft_weight(alpha, w, s, z, qmin, qmax, ZETA, GAMMA)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='inplace'):
        out.sum().backward()
