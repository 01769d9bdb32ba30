"""LSQQuantizer: trainable step, LSQ gradient scale, QDrop."""
import math

import pytest
import torch

from mmbrecq.quantizers import LSQQuantizer, UniformQuantizer


def _pair(bits=8, x=None, **kwargs):
    """Two LSQ quantizers with identical state, with and without the gradient scale."""
    a = LSQQuantizer(bits=bits, grad_scale=True, num_candidates=20, **kwargs)
    a.init_range(x)
    b = LSQQuantizer(bits=bits, grad_scale=False, num_candidates=20, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def test_defaults_per_tensor_lp_and_trainable_scale():
    q = LSQQuantizer(bits=4)
    assert q.num_channels is None and q.scale.shape == () and q.init == 'lp'
    assert q.scale.requires_grad and q.use_grad_scale and q.qdrop_prob is None
    assert not q.zero_point.requires_grad
    assert [n for n, p in q.named_parameters() if p.requires_grad] == ['scale']


def test_invalid_bits_raise():
    with pytest.raises(ValueError, match='bits=1'):
        LSQQuantizer(bits=1)


def test_scale_is_trained_by_an_optimizer_step():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    q = LSQQuantizer(bits=4, num_candidates=20)
    q.init_range(x)
    s0, z0 = q.scale.detach().clone(), q.zero_point.clone()
    loss = (q(x) - x).pow(2).sum()
    loss.backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0
    with torch.no_grad():  # a plain SGD step
        for p in q.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    assert not torch.equal(q.scale.detach(), s0)
    assert torch.equal(q.zero_point, z0)  # the zero point stays fixed


@pytest.mark.parametrize('shape,features', [((8, 16, 4, 4), 16 * 4 * 4), ((32, 10), 10), ((500, ), 500)])
@pytest.mark.parametrize('bits', [4, 8])
def test_gradient_scale_is_one_over_sqrt_features_times_qmax(shape, features, bits):
    torch.manual_seed(1)
    x = torch.randn(*shape) * 2
    a, b = _pair(bits, x)
    assert torch.equal(a.scale, b.scale)
    g = torch.randn(*shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa).backward(g)
    b(xb).backward(g)
    factor = 1.0 / math.sqrt(features * a.qmax)
    assert b.scale.grad.abs() > 1e-3
    assert torch.allclose(a.scale.grad, b.scale.grad * factor, rtol=1e-4, atol=0)
    # the input's gradient is untouched by the step's gradient scale
    assert torch.allclose(xa.grad, xb.grad)


def test_gradient_scale_applied_per_channel():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 5)
    a, b = _pair(4, x, num_channels=3, ch_axis=1)
    a(x).sum().backward()
    b(x).sum().backward()
    assert a.scale.grad.shape == (3, )
    assert torch.allclose(a.scale.grad, b.scale.grad / math.sqrt(3 * 5 * 5 * 15), rtol=1e-4)


def test_forward_matches_uniform_quantizer_with_same_state():
    torch.manual_seed(3)
    x = torch.randn(16, 32) * 3
    lsq = LSQQuantizer(bits=4, num_candidates=20)
    lsq.init_range(x)
    uni = UniformQuantizer(bits=4, num_candidates=20)
    uni.load_state_dict(lsq.state_dict())
    assert torch.allclose(lsq(x), uni(x), atol=1e-6)


def _drop_setup(p):
    torch.manual_seed(4)
    x = torch.randn(20, 100)  # small tensors stay single-threaded: fast on a busy machine
    q = LSQQuantizer(bits=4, init='minmax')
    q.init_range(x)
    with torch.no_grad():
        xq = q(x)  # QDrop off: the quantized values
    q.set_qdrop(1 - p)  # p: probability of keeping the float value
    return q, x, xq


@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_qdrop_train_mode_keeps_fraction_float(p):
    q, x, xq = _drop_setup(p)
    assert (xq != x).float().mean() > 0.99  # continuous inputs are almost never on the grid
    q.train()
    fracs = []
    for seed in range(10):
        torch.manual_seed(seed)
        out = q(x)
        kept_float = out == x
        quantized = out == xq
        assert (kept_float | quantized).all()  # every element is one or the other
        fracs.append((kept_float & ~quantized).float().mean().item())
    frac = sum(fracs) / len(fracs)
    assert abs(frac - p) < 0.02, frac  # 10 x 2000 elements: std of the fraction <= 0.0036
    torch.manual_seed(10)
    out = q(x)
    # seeded: the same seed drops the same elements
    torch.manual_seed(10)
    assert torch.equal(q(x), out)
    torch.manual_seed(11)
    assert not torch.equal(q(x), out)


def test_qdrop_gradient_flows_to_scale_only_through_quantized_elements():
    q, x, _ = _drop_setup(0.5)
    q.train()
    torch.manual_seed(0)
    out = q(x)
    out.sum().backward()
    g_drop = q.scale.grad.clone()
    q.scale.grad = None
    q.set_qdrop(None)
    q(x).sum().backward()
    # roughly half the elements contribute: different from the undropped gradient
    assert not torch.allclose(g_drop, q.scale.grad)


def test_qdrop_float_elements_pass_gradient_to_input():
    q, x, xq = _drop_setup(0.5)
    x = (x * 1.5).requires_grad_()  # some elements beyond the grid: no STE gradient there
    q.eval()
    with torch.no_grad():
        xq = q(x)  # eval mode: no dropping
    q.train()
    torch.manual_seed(0)
    out = q(x)
    out.sum().backward()
    kept_float = (out == x) & (out != xq)
    clipped = (x.detach() / q.scale.detach() + q.zero_point < q.qmin - 0.5) | \
        (x.detach() / q.scale.detach() + q.zero_point > q.qmax + 0.5)
    assert (kept_float & clipped).any() and (~kept_float & clipped).any()
    # float elements: identity gradient, even where the quantized value would be clamped
    assert (x.grad[kept_float] == 1).all()
    assert (x.grad[~kept_float & clipped] == 0).all()


@pytest.mark.parametrize('p', [0.5, 1.0])
def test_qdrop_has_no_effect_in_eval_mode(p):
    q, x, xq = _drop_setup(p)
    q.eval()
    torch.manual_seed(0)
    assert torch.equal(q(x), xq)


def test_state_dict_round_trip_keeps_trained_scale():
    torch.manual_seed(5)
    x = torch.randn(16, 8)
    q1 = LSQQuantizer(bits=4, num_candidates=20)
    q1.init_range(x)
    with torch.no_grad():
        q1.scale.mul_(1.37)  # as after training
    q2 = LSQQuantizer(bits=4, num_candidates=20)
    q2.load_state_dict(q1.state_dict())
    assert q2.initialized and q2.scale.requires_grad
    assert torch.equal(q2.scale, q1.scale)
    assert torch.equal(q2(x), q1(x))


def test_stream_mask_quantizes_only_the_marked_elements():
    """QDrop at a unit input: the step's mask, not the quantizer's own draw, decides; a wrong
    dtype or shape is an error rather than a silent broadcast."""
    q = LSQQuantizer(bits=4)
    x = torch.linspace(-1, 1, 24).reshape(2, 12)
    q.init_range(x)
    q.set_qdrop(0.5)
    q.train()
    mask = torch.arange(24).reshape(2, 12) % 3 == 0
    q.set_stream_mask(mask)
    assert not q.fusable
    out = q(x)
    q.set_stream_mask(None)
    q.set_qdrop(None)
    assert torch.equal(out[~mask], x[~mask])
    assert torch.equal(out[mask], q(x)[mask])
    with pytest.raises(TypeError, match='bool'):
        q.set_stream_mask(mask.float())
    q.set_stream_mask(mask[:1])
    with pytest.raises(ValueError, match='shape'):
        q(x)
