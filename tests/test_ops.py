"""The fused CPU kernels (mmbrecq.ops) against the torch code they replace.

The torch code is the reference: forward values must be equal bit for bit, gradients of
the activations equal (bit for bit where the expressions are the same), sums (loss, step
gradient) equal up to the rounding of a float reduction (the kernels sum in double).
"""
import contextlib
import math

import pytest
import torch

from mmbrecq.ops import cpu_kernels
from mmbrecq.quantizers import LSQQuantizer
from mmbrecq.quantizers.functional import _FakeQuantLSQ, fake_quant, fake_quant_lsq
from mmbrecq.reconstruction import objective
from mmbrecq.reconstruction.objective import quantized_reconstruction_loss, reconstruction_loss

from _reference import grad_scale

torch.set_num_threads(1)

needs_kernels = pytest.mark.skipif(not cpu_kernels.cpu_kernels_available(),
                                   reason=f'fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}')


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _activation(shape, s, z, qmin, qmax, seed=0):
    """Values spread over the grid and past both ends, with exact .5 ties and grid points."""
    g = _gen(seed)
    lo, hi = (qmin - z - 3) * s, (qmax - z + 3) * s
    x = torch.rand(shape, generator=g) * (hi - lo) + lo
    flat = x.view(-1)
    n = flat.numel()
    k = torch.randint(qmin - 2, qmax + 3, (n // 4, ), generator=g).float() - z
    flat[:n // 8] = (k[:n // 8] + 0.5) * s           # ties (exact for power-of-two s)
    flat[n // 8:n // 4] = k[n // 8:n // 4] * s       # grid points
    flat[n // 4] = -0.0
    return x


def _fq_run(x0, s0, z, qmin, qmax, factor, x_grad=True, s_grad=True, grad=None, kernel=True):
    """out, x.grad, s.grad of fake_quant_lsq with the kernel or the torch code."""
    x = x0.clone().requires_grad_(x_grad)
    s = s0.clone().requires_grad_(s_grad)
    ctx = contextlib.nullcontext() if kernel else cpu_kernels.disabled()
    with ctx:
        out = fake_quant_lsq(x, s, z, qmin, qmax, factor)
        if x_grad or s_grad:
            out.backward(torch.ones_like(out) if grad is None else grad)
    return out.detach(), x.grad, s.grad


GRIDS = [  # qmin, qmax, z, s
    (0, 255, 3.0, 0.0625), (-8, 7, 0.0, 0.25), (0, 15, 7.0, 0.5), (0, 3, 1.0, 0.125), (-128, 127, -5.0, 0.03125),
]


# ---------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------
def test_kernels_build_here(monkeypatch):
    """The extension builds on this machine (g++ and ninja are set up by tools/setup_env.sh)."""
    if cpu_kernels._disabled_by_env():
        pytest.skip('MMBRECQ_CPU_KERNELS=0 is set')
    assert cpu_kernels.cpu_kernels_available(), cpu_kernels.unavailable_reason()
    m = cpu_kernels.get_cpu_kernels()
    assert m.current_isa() in m.isa_names() and m.isa_names()[0] == 'isa_base'


@pytest.fixture
def fresh_loader():
    cpu_kernels.reset_cpu_kernels()
    yield
    cpu_kernels.reset_cpu_kernels()


def test_env_var_zero_gives_the_torch_code(monkeypatch, fresh_loader):
    monkeypatch.setenv('MMBRECQ_CPU_KERNELS', '0')
    cpu_kernels.reset_cpu_kernels()
    assert not cpu_kernels.cpu_kernels_available()
    assert 'MMBRECQ_CPU_KERNELS' in cpu_kernels.unavailable_reason()

    def fail(*args, **kwargs):
        raise AssertionError('kernel called although disabled')

    for name in ('fake_quant_forward', 'fake_quant_backward_x', 'squared_error_forward'):
        monkeypatch.setattr(cpu_kernels, name, fail)
    x0 = _activation((2, 3, 4, 4), 0.25, 0.0, -8, 7)
    out, gx, gs = _fq_run(x0, torch.tensor(0.25), torch.tensor(0.), -8, 7, 0.5)
    s = torch.tensor(0.25).requires_grad_()
    ref = fake_quant(x0, grad_scale(s, 0.5), torch.tensor(0.), -8, 7)
    assert torch.equal(out, ref.detach())
    q = _lsq(4, True, True, 0.25, 0.0)
    y = torch.randn(2, 3, 4, 4)
    loss = quantized_reconstruction_loss(x0.clone().requires_grad_(), q, y)
    loss.backward()
    assert torch.isfinite(loss)


def test_env_var_other_values_keep_kernels(monkeypatch, fresh_loader):
    monkeypatch.setenv('MMBRECQ_CPU_KERNELS', '1')
    cpu_kernels.reset_cpu_kernels()
    assert cpu_kernels.cpu_kernels_available() == (cpu_kernels.unavailable_reason() is None)


def test_build_failure_warns_once_and_falls_back(monkeypatch, fresh_loader):
    monkeypatch.delenv('MMBRECQ_CPU_KERNELS', raising=False)
    warnings = []
    monkeypatch.setattr(cpu_kernels, '_warn', warnings.append)

    def broken():
        raise OSError('no compiler here')

    monkeypatch.setattr(cpu_kernels, '_build', broken)
    assert cpu_kernels.get_cpu_kernels() is None
    assert not cpu_kernels.cpu_kernels_available()
    x = torch.randn(3, 4)
    out = fake_quant_lsq(x, torch.tensor(0.1), torch.tensor(2.), 0, 15)  # the torch code
    assert torch.equal(out, fake_quant(x, torch.tensor(0.1), torch.tensor(2.), 0, 15))
    assert len(warnings) == 1 and 'no compiler here' in warnings[0]


# ---------------------------------------------------------------------------------------
# fake-quant node: kernel == torch code
# ---------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize('qmin,qmax,z,s', GRIDS)
def test_fake_quant_kernel_equals_torch_node(qmin, qmax, z, s):
    x0 = _activation((4, 3, 6, 5), s, z, qmin, qmax, seed=qmin + qmax)
    s0, zt = torch.tensor(s), torch.tensor(z)
    grad = torch.randn(x0.shape, generator=_gen(1))
    k = _fq_run(x0, s0, zt, qmin, qmax, 0.1, grad=grad)
    t = _fq_run(x0, s0, zt, qmin, qmax, 0.1, grad=grad, kernel=False)
    assert torch.equal(k[0], t[0])
    assert torch.equal(k[1], t[1])
    torch.testing.assert_close(k[2], t[2], rtol=1e-5, atol=1e-6)
    assert k[2].shape == t[2].shape == ()
    # every regime is there: below, on and above the grid
    r = torch.round(x0 / s) + z
    assert (r < qmin).any() and (r > qmax).any() and ((r >= qmin) & (r <= qmax)).any()
    # and the composed reference of functional.fake_quant
    sr = s0.clone().requires_grad_()
    xr = x0.clone().requires_grad_()
    ref = fake_quant(xr, grad_scale(sr, 0.1), zt, qmin, qmax)
    ref.backward(grad)
    assert torch.equal(k[0], ref.detach())
    torch.testing.assert_close(k[1], xr.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(k[2], sr.grad, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_fake_quant_kernel_ties_round_half_to_even():
    s = 0.25
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -3.5, 6.5, -7.5])
    x = v * s
    out, dscale, mask = cpu_kernels.fake_quant_forward(x, s, 0.0, -8, 7, need_dscale=True, need_mask=True)
    expect_q = torch.tensor([-2., -2., -0., 0., 2., 2., 4., -4., 6., -8.])
    assert torch.equal(out, expect_q * s)
    assert torch.equal(out, torch.round(v) * s)
    assert mask.all()
    assert torch.equal(dscale, expect_q - v)
    ref = fake_quant(x, torch.tensor(s), torch.tensor(0.), -8, 7)  # round(-0.5) + z = +0 there
    assert torch.equal(torch.signbit(out), torch.signbit(ref))


@needs_kernels
def test_fake_quant_kernel_outside_grid_and_special_values():
    s, z, qmin, qmax = 0.5, 3.0, 0, 15
    x = torch.tensor([-1e30, -100., -2., -1.5, -1.74, 6., 6.24, 6.26, 100., 3e38, float('inf'), float('-inf'),
                      1e-45, -0.0, 0.0])
    k = cpu_kernels.fake_quant_forward(x, s, z, qmin, qmax, need_dscale=True, need_mask=True)
    with cpu_kernels.disabled():
        ctx = type('Ctx', (), {'needs_input_grad': (True, True)})()
        saved = []
        ctx.save_for_backward = lambda *t: saved.extend(t)
        ref = _FakeQuantLSQ.forward(ctx, x, torch.tensor(s), torch.tensor(z), qmin, qmax, 1.0)
    assert torch.equal(k[0], ref)
    assert torch.equal(k[2], saved[0])
    assert torch.equal(k[1].nan_to_num(), saved[1].nan_to_num())
    assert torch.equal(k[1].isnan(), saved[1].isnan())  # inf inputs: q - inf * 0, as torch


@needs_kernels
def test_fake_quant_kernel_nan_propagates():
    x = torch.tensor([float('nan'), 1.0])
    out = cpu_kernels.fake_quant_forward(x, 0.5, 0.0, 0, 15)[0]
    ref = fake_quant(x, torch.tensor(0.5), torch.tensor(0.), 0, 15)
    assert out.isnan()[0] and ref.isnan()[0] and out[1] == ref[1]


@needs_kernels
@pytest.mark.parametrize('x_grad,s_grad', [(True, False), (False, True), (True, True)])
def test_fake_quant_kernel_partial_gradients(x_grad, s_grad):
    qmin, qmax, z, s = -8, 7, 0.0, 0.25
    x0 = _activation((2, 4, 5, 5), s, z, qmin, qmax, seed=5)
    grad = torch.randn(x0.shape, generator=_gen(6))
    k = _fq_run(x0, torch.tensor(s), torch.tensor(z), qmin, qmax, 0.3, x_grad, s_grad, grad)
    t = _fq_run(x0, torch.tensor(s), torch.tensor(z), qmin, qmax, 0.3, x_grad, s_grad, grad, kernel=False)
    assert torch.equal(k[0], t[0])
    assert (k[1] is None) == (not x_grad) and (k[2] is None) == (not s_grad)
    if x_grad:
        assert torch.equal(k[1], t[1])
    if s_grad:
        torch.testing.assert_close(k[2], t[2], rtol=1e-5, atol=1e-6)


@needs_kernels
def test_fake_quant_kernel_no_grad_and_python_scalars():
    x = _activation((3, 5, 7), 0.125, 1.0, 0, 3, seed=7)
    with torch.no_grad():
        out = fake_quant_lsq(x, torch.tensor(0.125, requires_grad=True), torch.tensor(1.), 0, 3)
    assert not out.requires_grad
    assert torch.equal(out, fake_quant(x, torch.tensor(0.125), torch.tensor(1.), 0, 3))
    # Python numbers for step and zero point (the low-level wrapper)
    assert torch.equal(cpu_kernels.fake_quant_forward(x, 0.125, 1, 0, 3)[0], out)


@needs_kernels
@pytest.mark.parametrize('layout', ['transposed', 'strided', 'channels_last'])
def test_fake_quant_kernel_non_contiguous_input(layout):
    qmin, qmax, z, s = 0, 255, 100.0, 0.0625
    base = _activation((4, 6, 5, 8), s, z, qmin, qmax, seed=8)
    x0 = {'transposed': base.transpose(1, 3), 'strided': base[:, ::2, 1:, ::3],
          'channels_last': base.contiguous(memory_format=torch.channels_last)}[layout]
    assert not x0.is_contiguous()
    grad = torch.randn(x0.shape, generator=_gen(9))
    outs = []
    for kernel in (True, False):
        x = x0.detach().requires_grad_()
        assert not x.is_contiguous()
        s0 = torch.tensor(s, requires_grad=True)
        ctx = contextlib.nullcontext() if kernel else cpu_kernels.disabled()
        with ctx:
            y = fake_quant_lsq(x, s0, torch.tensor(z), qmin, qmax, 0.2)
            y.backward(grad)
        outs.append((y.detach(), x.grad, s0.grad))
    (yk, gxk, gsk), (yt, gxt, gst) = outs
    assert torch.equal(yk, yt) and torch.equal(gxk, gxt)
    torch.testing.assert_close(gsk, gst, rtol=1e-5, atol=1e-6)
    if layout == 'channels_last':  # dense layouts are kept, as torch's element-wise ops do
        assert yk.is_contiguous(memory_format=torch.channels_last)


@needs_kernels
def test_fake_quant_kernel_expanded_gradient_of_a_sum():
    x0 = _activation((3, 4, 6), 0.5, 7.0, 0, 15, seed=10)
    k = _fq_run(x0, torch.tensor(0.5), torch.tensor(7.), 0, 15, 0.1)  # backward of ones (dense)
    x = x0.clone().requires_grad_()
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant_lsq(x, s, torch.tensor(7.), 0, 15, 0.1).sum().backward()  # expanded (stride 0) gradient
    assert torch.equal(x.grad, k[1])
    torch.testing.assert_close(s.grad, k[2])


@needs_kernels
def test_fake_quant_kernel_one_shaped_scale_keeps_its_shape():
    x0 = _activation((2, 3, 4, 4), 0.25, 0.0, -8, 7, seed=11)
    s = torch.full((1, 1, 1, 1), 0.25, requires_grad=True)
    out = fake_quant_lsq(x0, s, torch.zeros(1, 1, 1, 1), -8, 7, 0.5)
    out.sum().backward()
    assert s.grad.shape == (1, 1, 1, 1) and out.shape == x0.shape
    # a step with more dims than x would broadcast the output: the torch code handles it
    s5 = torch.full((1, 1, 1, 1, 1), 0.25)
    assert fake_quant_lsq(x0, s5, torch.tensor(0.), -8, 7).shape == (1, 2, 3, 4, 4)


@needs_kernels
def test_fake_quant_kernel_second_backward_through_retained_graph():
    """The kernel's backward recomputes from the saved input: a retained graph gives the same
    gradients twice; an in-place change of the input before the backward raises."""
    x = torch.randn(2, 3, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    out = fake_quant_lsq(x, s, torch.tensor(3.), 0, 15)
    out.sum().backward(retain_graph=True)
    first = x.grad.clone(), s.grad.clone()
    x.grad, s.grad = None, None
    out.sum().backward()
    assert torch.equal(x.grad, first[0]) and torch.equal(s.grad, first[1])
    y = torch.randn(2, 3)
    out = fake_quant_lsq(y, s, torch.tensor(3.), 0, 15)
    y.mul_(2)
    with pytest.raises(RuntimeError, match='inplace'):
        out.sum().backward()


@needs_kernels
def test_fake_quant_kernel_create_graph_uses_torch_backward():
    x0 = _activation((2, 3, 5), 0.25, 2.0, 0, 15, seed=12)
    grads = []
    for kernel in (True, False):
        x = x0.clone().requires_grad_()
        s = torch.tensor(0.25, requires_grad=True)
        ctx = contextlib.nullcontext() if kernel else cpu_kernels.disabled()
        with ctx:
            out = fake_quant_lsq(x, s, torch.tensor(2.), 0, 15, 0.5)
            gx, gs = torch.autograd.grad((out * out).sum(), (x, s), create_graph=True)
        grads.append((gx.detach(), gs.detach()))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@needs_kernels
def test_fake_quant_kernel_large_tensor():
    qmin, qmax, z, s = 0, 255, 128.0, 0.03125
    x0 = _activation((4, 64, 64, 64), s, z, qmin, qmax, seed=13)  # 1 M elements, several blocks
    grad = torch.randn(x0.shape, generator=_gen(14))
    with num_threads(2):
        k = _fq_run(x0, torch.tensor(s), torch.tensor(z), qmin, qmax, 0.01, grad=grad)
    t = _fq_run(x0, torch.tensor(s), torch.tensor(z), qmin, qmax, 0.01, grad=grad, kernel=False)
    assert torch.equal(k[0], t[0]) and torch.equal(k[1], t[1])
    torch.testing.assert_close(k[2], t[2], rtol=1e-4, atol=1e-4)
    # the kernel's double sum of the float products grad * dscale
    ctx = type('Ctx', (), {'needs_input_grad': (True, True)})()
    saved = []
    ctx.save_for_backward = lambda *t: saved.extend(t)
    with cpu_kernels.disabled():
        _FakeQuantLSQ.forward(ctx, x0, torch.tensor(s), torch.tensor(z), qmin, qmax, 1.0)
    exact = float((grad * saved[1]).double().sum()) * 0.01
    assert float(k[2]) == pytest.approx(exact, rel=1e-6)


@needs_kernels
def test_fake_quant_kernel_sums_do_not_depend_on_thread_count():
    x0 = _activation((2, 64, 48, 48), 0.0625, 3.0, 0, 255, seed=15)
    grad = torch.randn(x0.shape, generator=_gen(16))
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            results.append(_fq_run(x0, torch.tensor(0.0625), torch.tensor(3.), 0, 255, 1.0, grad=grad))
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


@needs_kernels
def test_kernel_instruction_set_versions_agree_bitwise():
    m = cpu_kernels.get_cpu_kernels()
    x = _activation((3, 16, 20, 21), 0.0625, 3.0, 0, 255, seed=17)  # odd sizes: vector tails
    y, w = torch.randn(x.shape, generator=_gen(18)), torch.rand(x.shape, generator=_gen(19))
    g = torch.randn(x.shape, generator=_gen(20))
    before = m.current_isa()
    results = {}
    try:
        for isa in m.isa_names():
            m.set_isa(isa)
            out, d, mask = m.fake_quant_forward(x, 0.0625, 3.0, 0, 255, True, True)
            gx, total = m.fake_quant_backward_x(g, x, 0.0625, 3.0, 0, 255, True, True)
            loss, gout, ssum = m.squared_error_forward(x, y, w, 1260, True, 0.0625, 3.0, 0, 255, True, True)
            lq = _log_quant_kernel(x.abs() / 4, 0.5, 2, 15)
            # from x: grad * inside and sum(grad * dscale) of the forward's own buffers
            assert torch.equal(gx, g * mask) and math.isclose(total, float((g.double() * d.double()).sum()),
                                                              rel_tol=1e-6, abs_tol=1e-6)
            results[isa] = (out, d, mask, gx, total, loss, gout, ssum, lq)
    finally:
        m.set_isa(before)
    ref = results['isa_base']
    for isa, r in results.items():
        for a, b in zip(ref, r):
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), isa
    with pytest.raises(RuntimeError, match='not supported'):
        m.set_isa('isa_nonexistent')


@needs_kernels
def test_fake_quant_under_tracing_uses_torch_code(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('kernel called while tracing')

    s, z = torch.tensor(0.25), torch.tensor(2.)
    x = _activation((2, 3, 4), 0.25, 2.0, 0, 15, seed=44)
    expect = fake_quant_lsq(x, s, z, 0, 15)
    monkeypatch.setattr(cpu_kernels, 'fake_quant_forward', fail)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: fake_quant_lsq(t, s, z, 0, 15), (x, ), check_trace=False)
    monkeypatch.undo()  # the traced graph runs the node's Python forward, kernel included
    assert torch.equal(traced(x), expect)


# ---------------------------------------------------------------------------------------
# squared-error node
# ---------------------------------------------------------------------------------------
def _loss_run(out0, y, w, scale_grad=1.0, kernel=True):
    out = out0.clone().requires_grad_()
    ctx = contextlib.nullcontext() if kernel else cpu_kernels.disabled()
    with ctx:
        loss = reconstruction_loss(out, y, w)
        (loss * scale_grad if scale_grad != 1.0 else loss).backward()
    return loss.detach(), out.grad


@needs_kernels
@pytest.mark.parametrize('shape', [(4, 3, 5, 5), (6, 10), (17, )])
@pytest.mark.parametrize('weighted', [False, True])
def test_squared_error_kernel_equals_torch_node(shape, weighted):
    out0 = torch.randn(shape, generator=_gen(1))
    y = torch.randn(shape, generator=_gen(2))
    w = torch.rand(shape, generator=_gen(3)) if weighted else None
    lk, gk = _loss_run(out0, y, w)
    lt, gt = _loss_run(out0, y, w, kernel=False)
    torch.testing.assert_close(lk, lt, rtol=1e-6, atol=0)
    assert torch.equal(gk, gt)  # same float expression: w * err * (2 / count)
    # an incoming gradient other than 1: one more rounding
    lk3, gk3 = _loss_run(out0, y, w, scale_grad=3.0)
    lt3, gt3 = _loss_run(out0, y, w, scale_grad=3.0, kernel=False)
    torch.testing.assert_close(gk3, gt3, rtol=1e-6, atol=0)


@needs_kernels
def test_squared_error_kernel_large_tensor_and_no_grad():
    shape = (4, 64, 64, 64)
    out0, y = torch.randn(shape, generator=_gen(4)), torch.randn(shape, generator=_gen(5))
    w = torch.rand(shape, generator=_gen(6))
    with num_threads(2):
        lk, gk = _loss_run(out0, y, w)
    lt, gt = _loss_run(out0, y, w, kernel=False)
    assert torch.equal(gk, gt)
    exact = float(((out0.double() - y.double()) ** 2 * w.double()).sum() / (4 * 64 * 64))
    assert float(lk) == pytest.approx(exact, rel=1e-6)
    torch.testing.assert_close(lk, lt, rtol=1e-5, atol=0)
    with torch.no_grad():
        assert float(reconstruction_loss(out0, y, w)) == float(lk)
    assert float(reconstruction_loss(out0, y, w)) == float(lk)  # nothing requires grad


@needs_kernels
def test_squared_error_kernel_broadcast_weight_uses_torch_code():
    out0, y = torch.randn(2, 3, 4, 4, generator=_gen(7)), torch.randn(2, 3, 4, 4, generator=_gen(8))
    w = torch.rand(1, 3, 1, 1, generator=_gen(9))
    lk, gk = _loss_run(out0, y, w)
    lt, gt = _loss_run(out0, y, w, kernel=False)
    assert torch.equal(lk, lt) and torch.equal(gk, gt)


# ---------------------------------------------------------------------------------------
# fused quantized reconstruction loss
# ---------------------------------------------------------------------------------------
def _lsq(bits, symmetric, signed, s, z, grad_scale_on=True, per_channel=None):
    q = LSQQuantizer(bits=bits, symmetric=symmetric, signed=signed, grad_scale=grad_scale_on,
                     num_channels=per_channel, ch_axis=1)
    if per_channel is None:
        q.scale.data.fill_(s)
    else:
        q.scale.data.copy_(torch.linspace(s, 2 * s, per_channel))
    q.zero_point.fill_(z)
    q.initialized = True
    return q


def _qloss_run(q, out0, y, w, fused=True, kernel=True, scale_grad=1.0):
    out = out0.clone().requires_grad_()
    q.scale.grad = None
    ctx = contextlib.nullcontext() if kernel else cpu_kernels.disabled()
    with ctx:
        loss = quantized_reconstruction_loss(out, q, y, w) if fused else reconstruction_loss(q(out), y, w)
        (loss * scale_grad if scale_grad != 1.0 else loss).backward()
    return loss.detach(), out.grad, None if q.scale.grad is None else q.scale.grad.clone()


QUANT_CASES = [  # bits, symmetric, signed, s, z
    (8, False, True, 0.0625, 3.0), (4, True, True, 0.25, 0.0), (4, False, True, 0.5, 7.0), (2, False, True, 0.125, 1.0),
    (8, True, False, 0.03125, 0.0),
]


@needs_kernels
@pytest.mark.parametrize('bits,symmetric,signed,s,z', QUANT_CASES)
@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('scale_grad', [True, False])
def test_quantized_loss_equals_unfused_composition(bits, symmetric, signed, s, z, weighted, scale_grad):
    q = _lsq(bits, symmetric, signed, s, z)
    q.scale.requires_grad_(scale_grad)
    q.train()
    shape = (4, 3, 6, 5)
    out0 = _activation(shape, s, z, q.qmin, q.qmax, seed=bits)
    y = fake_quant(torch.randn(shape, generator=_gen(21)) * s * 4, torch.tensor(s), torch.tensor(z), q.qmin, q.qmax)
    y = y + torch.randn(shape, generator=_gen(22)) * s * 0.3
    w = torch.rand(shape, generator=_gen(23)) * 2 if weighted else None
    fused = _qloss_run(q, out0, y, w)
    unfused = _qloss_run(q, out0, y, w, fused=False)                  # kernels for each node
    torch_ref = _qloss_run(q, out0, y, w, fused=False, kernel=False)  # the torch code
    for ref in (unfused, torch_ref):
        torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-7)
        assert torch.equal(fused[1], ref[1])
        if scale_grad:
            torch.testing.assert_close(fused[2], ref[2], rtol=1e-4, atol=1e-7)
        else:
            assert fused[2] is None and ref[2] is None
    # the regimes the step gradient depends on are all there
    r = torch.round(out0 / s) + z
    assert (r < q.qmin).any() and (r > q.qmax).any()


@needs_kernels
@pytest.mark.parametrize('grad_scale_on', [True, False])
def test_quantized_loss_incoming_gradient_and_grad_scale(grad_scale_on):
    q = _lsq(4, False, True, 0.5, 7.0, grad_scale_on=grad_scale_on)
    shape = (3, 4, 5, 5)
    out0 = _activation(shape, 0.5, 7.0, q.qmin, q.qmax, seed=24)
    y, w = torch.randn(shape, generator=_gen(25)), torch.rand(shape, generator=_gen(26))
    fused = _qloss_run(q, out0, y, w, scale_grad=0.37)
    ref = _qloss_run(q, out0, y, w, fused=False, kernel=False, scale_grad=0.37)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-4, atol=1e-7)
    assert fused[2].shape == q.scale.shape == ()


@needs_kernels
def test_quantized_loss_large_tensor():
    q = _lsq(8, False, True, 0.03125, 128.0)
    shape = (4, 64, 64, 64)
    out0 = _activation(shape, 0.03125, 128.0, q.qmin, q.qmax, seed=27)
    y, w = torch.randn(shape, generator=_gen(28)), torch.rand(shape, generator=_gen(29))
    with num_threads(2):
        fused = _qloss_run(q, out0, y, w)
    ref = _qloss_run(q, out0, y, w, fused=False, kernel=False)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=0)
    assert torch.equal(fused[1], ref[1])
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-3, atol=1e-6)


@needs_kernels
def test_quantized_loss_no_grad_value():
    q = _lsq(4, True, True, 0.25, 0.0)
    out0 = _activation((2, 3, 4, 4), 0.25, 0.0, q.qmin, q.qmax, seed=30)
    y = torch.randn(2, 3, 4, 4, generator=_gen(31))
    with torch.no_grad():
        a = quantized_reconstruction_loss(out0, q, y)
        with cpu_kernels.disabled():
            b = reconstruction_loss(q(out0), y)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.fixture
def no_fused_node(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('fused node used where the composition is required')

    monkeypatch.setattr(objective._QuantizedSquaredError, 'apply', fail)


def _falls_back(q, out0, y, w=None):
    fused = _qloss_run(q, out0, y, w)
    ref = _qloss_run(q, out0, y, w, fused=False)
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1])
    assert (fused[2] is None and ref[2] is None) or torch.equal(fused[2], ref[2])


def test_quantized_loss_disabled_quantizer_is_plain_loss(no_fused_node):
    q = _lsq(4, True, True, 0.25, 0.0)
    q.enabled = False
    out0, y = torch.randn(2, 3, 4, 4, generator=_gen(32)), torch.randn(2, 3, 4, 4, generator=_gen(33))
    _falls_back(q, out0, y)
    assert torch.equal(quantized_reconstruction_loss(out0, q, y), reconstruction_loss(out0, y))


def test_quantized_loss_uninitialised_quantizer_raises(no_fused_node):
    q = LSQQuantizer(bits=4)
    with pytest.raises(RuntimeError, match='before its range was initialised'):
        quantized_reconstruction_loss(torch.randn(2, 3), q, torch.randn(2, 3))


def test_quantized_loss_qdrop_training_uses_composition(no_fused_node):
    q = _lsq(4, False, True, 0.5, 7.0)
    q.set_qdrop(0.5)
    q.train()
    out0, y = torch.randn(2, 3, 4, 4, generator=_gen(34)), torch.randn(2, 3, 4, 4, generator=_gen(35))
    torch.manual_seed(0)
    fused = _qloss_run(q, out0, y, None)
    torch.manual_seed(0)
    ref = _qloss_run(q, out0, y, None, fused=False)
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1]) and torch.equal(fused[2], ref[2])


def test_quantized_loss_per_channel_uses_composition(no_fused_node):
    q = _lsq(4, False, True, 0.25, 3.0, per_channel=3)
    out0, y = torch.randn(2, 3, 4, 4, generator=_gen(36)), torch.randn(2, 3, 4, 4, generator=_gen(37))
    _falls_back(q, out0, y)


def test_quantized_loss_float64_uses_composition(no_fused_node):
    q = _lsq(4, False, True, 0.25, 3.0).double()
    out0 = torch.randn(2, 3, 4, 4, generator=_gen(38), dtype=torch.float64)
    y = torch.randn(2, 3, 4, 4, generator=_gen(39), dtype=torch.float64)
    _falls_back(q, out0, y)


def test_quantized_loss_kernels_disabled_uses_composition(no_fused_node):
    q = _lsq(4, False, True, 0.25, 3.0)
    out0, y = torch.randn(2, 3, 4, 4, generator=_gen(40)), torch.randn(2, 3, 4, 4, generator=_gen(41))
    with cpu_kernels.disabled():
        _falls_back(q, out0, y)


def test_quantized_loss_overridden_quantize_uses_composition(no_fused_node):
    class Shifted(LSQQuantizer):
        def quantize(self, x):
            return super().quantize(x) + 1

    q = Shifted(bits=4)
    q.scale.data.fill_(0.25)
    q.initialized = True
    out0, y = torch.randn(2, 3, 4, 4, generator=_gen(42)), torch.randn(2, 3, 4, 4, generator=_gen(43))
    _falls_back(q, out0, y)


# ---------------------------------------------------------------------------------------
# logarithmic quantizer (Log2Quantizer's forward)
# ---------------------------------------------------------------------------------------
def _log_quant_kernel(x, delta, k, qmax):
    from mmbrecq.quantizers.log2 import _levels, _mantissa_bits
    return cpu_kernels.log_quant_forward(x, delta, k, qmax, _levels(qmax, float(k)), _mantissa_bits(float(k)))


def _log_inputs(delta, seed=0):
    """Softmax-like values, grid points and their float neighbours, half-code boundaries,
    and the special values."""
    g = _gen(seed)
    soft = torch.softmax(torch.randn(2, 3, 33, 33, generator=g) * 4, dim=-1).reshape(-1)
    codes = torch.arange(0, 300, dtype=torch.float64)
    grid = (delta * torch.pow(2.0, -codes / 2)).float()
    half = (delta * torch.pow(2.0, -(codes + 0.5) / 2)).float()
    near = torch.cat([grid, half, torch.nextafter(half, torch.zeros(())), torch.nextafter(half, torch.ones(()))])
    special = torch.tensor([0.0, -0.0, -1.0, 1e-45, 1e-40, 1e-38, 3.0, delta, 2 * delta, float('inf'),
                            float('-inf'), float('nan'), torch.finfo(torch.float32).tiny, 1.0])
    return torch.cat([soft, near, special])


@needs_kernels
@pytest.mark.parametrize('bits,base', [(3, 'sqrt2'), (4, 'sqrt2'), (4, '2'), (8, 'sqrt2'), (8, '2')])
@pytest.mark.parametrize('delta', [1.0, 0.7071, 0.123])
def test_log_quant_kernel_equals_torch_code(bits, base, delta):
    from mmbrecq.quantizers import Log2Quantizer
    q = Log2Quantizer(bits=bits, base=base)
    q.load_qparams(torch.tensor(delta), torch.tensor(0.0))
    x = _log_inputs(delta, seed=bits)
    out = q(x)
    with cpu_kernels.disabled():
        ref = q(x)
    assert torch.equal(out.isnan(), ref.isnan()) and int(out.isnan().sum()) == 1  # nan stays nan
    assert torch.equal(out[~out.isnan()], ref[~ref.isnan()])
    with cpu_kernels.disabled():
        assert torch.equal(torch.nan_to_num(q._values(x, q.scale)), torch.nan_to_num(ref))


@needs_kernels
def test_log_quant_kernel_large_non_contiguous_and_threads():
    from mmbrecq.quantizers import Log2Quantizer
    q = Log2Quantizer(bits=4)
    x = torch.softmax(torch.randn(8, 6, 70, 70, generator=_gen(3)) * 3, dim=-1).transpose(-2, -1)
    q.init_range(x)
    with cpu_kernels.disabled():
        ref = q(x)
    outs = []
    for n in (1, 2):
        with num_threads(n):
            outs.append(q(x))
    assert all(torch.equal(o, ref) for o in outs)
