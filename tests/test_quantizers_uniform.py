"""UniformQuantizer: configuration checks, initialisation, forward and state."""
import io

import pytest
import torch

from mmbrecq.quantizers import VALID_BITS, UniformQuantizer, check_bits
from mmbrecq.quantizers.functional import fake_quant, qparams_from_range
from mmbrecq.quantizers.range_search import lp_search_range


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [0, 1, 9, 32, -4, 4.0, True, '8', None])
def test_invalid_bits_raise_value_error_naming_key(bits):
    with pytest.raises(ValueError, match=r'^bits='):
        UniformQuantizer(bits=bits)


def test_check_bits_names_the_given_key_and_accepts_valid_widths():
    for b in VALID_BITS:
        assert check_bits(b, key='w_bits') == b
    with pytest.raises(ValueError, match=r"a_bits=1 "):
        check_bits(1, key='a_bits')
    with pytest.raises(ValueError, match=r'w_bits=12 '):
        check_bits(12, key='w_bits')


def test_invalid_init_raises():
    with pytest.raises(ValueError, match='init'):
        UniformQuantizer(bits=4, init='mse')


@pytest.mark.parametrize('bits,symmetric,signed,grid', [
    (2, False, True, (0, 3)), (4, False, False, (0, 15)), (8, False, True, (0, 255)),
    (4, True, True, (-8, 7)), (8, True, True, (-128, 127)), (4, True, False, (0, 15)),
    (3, True, True, (-4, 3)), (16, False, True, (0, 65535)),
])
def test_grid_limits(bits, symmetric, signed, grid):
    q = UniformQuantizer(bits=bits, symmetric=symmetric, signed=signed)
    assert (q.qmin, q.qmax) == grid


def test_per_channel_shapes_and_per_tensor_ignores_axis():
    q = UniformQuantizer(bits=4, num_channels=6, ch_axis=1)
    assert q.scale.shape == (6, ) and q.zero_point.shape == (6, ) and q.ch_axis == 1
    t = UniformQuantizer(bits=4, ch_axis=1)
    assert t.scale.shape == () and t.ch_axis is None
    assert not q.scale.requires_grad  # a plain uniform quantizer does not learn its step


# ---------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------
def test_uninitialised_forward_raises_runtime_error():
    q = UniformQuantizer(bits=8)
    with pytest.raises(RuntimeError, match='initialised'):
        q(torch.randn(4, 4))
    assert not q.initialized


def test_observing_initialises_on_first_forward_only():
    torch.manual_seed(0)
    x1, x2 = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 10
    q = UniformQuantizer(bits=4, init='minmax')
    q.start_observing()
    out = q(x1)
    assert q.initialized
    ref = UniformQuantizer(bits=4, init='minmax')
    ref.init_range(x1)
    assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero_point, ref.zero_point)
    assert torch.equal(out, ref(x1))
    s = q.scale.clone()
    q(x2)  # already initialised: the second batch does not move the range
    assert torch.equal(q.scale, s)


def test_observing_per_channel_lp_initialisation():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6) * torch.tensor([0.1, 1., 3., 10.]).view(1, 4, 1, 1)
    q = UniformQuantizer(bits=4, num_channels=4, ch_axis=1, num_candidates=20)
    q.start_observing()
    q(x)
    lo, hi = lp_search_range(x, 0, 15, False, ch_axis=1, num_candidates=20)
    scale, zp = qparams_from_range(lo, hi, 0, 15, False)
    assert torch.equal(q.scale.detach(), scale) and torch.equal(q.zero_point, zp)


def test_init_range_minmax_values():
    w = torch.tensor([[-1., 0.5, 2.], [0.25, 1., 3.]])  # per row: [-1, 2] and [0, 3]
    q = UniformQuantizer(bits=2, num_channels=2, ch_axis=0, init='minmax')
    q.init_range(w)
    assert torch.allclose(q.scale.detach(), torch.tensor([1., 1.]))
    assert torch.equal(q.zero_point, torch.tensor([1., 0.]))
    assert q.initialized
    # the range ends are on the grid (min-max never clips), 0.5 rounds half to even
    assert torch.equal(q(w), torch.tensor([[-1., 0., 2.], [0., 1., 3.]]))


def test_enabled_false_is_identity_even_uninitialised():
    torch.manual_seed(2)
    x = torch.randn(3, 7, requires_grad=True)
    q = UniformQuantizer(bits=2)
    q.enabled = False
    q.start_observing()
    out = q(x)
    assert out is x
    assert not q.initialized  # disabled quantizers do not observe either
    q.enabled = True
    assert not torch.equal(q(x), x)  # 2 bits: clearly not the identity once enabled


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('symmetric', [False, True])
def test_forward_per_channel_axis1_on_grid_and_close(symmetric):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, 5) * torch.tensor([0.1, 1., 5.]).view(1, 3, 1, 1)
    q = UniformQuantizer(bits=8, num_channels=3, ch_axis=1, symmetric=symmetric, init='minmax')
    q.init_range(x)
    out = q(x)
    s = q.scale.detach().view(1, 3, 1, 1)
    z = q.zero_point.view(1, 3, 1, 1)
    k = out / s + z
    assert torch.allclose(k, torch.round(k), atol=1e-3)
    assert ((k >= q.qmin - 1e-3) & (k <= q.qmax + 1e-3)).all()
    assert ((out - x).abs() <= 0.5 * s + 1e-6).all()  # min-max: no clipping, half a step at most
    assert torch.equal(out, fake_quant(x, s, z, q.qmin, q.qmax))


def test_forward_straight_through_gradient_to_input():
    x = torch.tensor([-3., -0.4, 0.2, 0.9, 5.], requires_grad=True)
    q = UniformQuantizer(bits=2, init='minmax')
    q.init_range(torch.tensor([-1., 2.]))  # s = 1, z = 1, grid covers [-1, 2]
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0., 1., 1., 1., 0.]))


def test_integer_repr_consistent_with_forward():
    torch.manual_seed(4)
    w = torch.randn(5, 3, 3, 3)
    q = UniformQuantizer(bits=4, num_channels=5, init='lp', num_candidates=20)
    q.init_range(w)
    ints = q.integer_repr(w)
    assert torch.equal(ints, torch.round(ints))
    assert ints.min() >= q.qmin and ints.max() <= q.qmax
    s, z = q.scale.detach().view(5, 1, 1, 1), q.zero_point.view(5, 1, 1, 1)
    assert torch.equal((ints - z) * s, q(w))
    # inputs beyond the calibrated range are clamped to the grid, as in forward
    big = w * 3
    ints = q.integer_repr(big)
    assert ints.min() == q.qmin and ints.max() == q.qmax
    assert torch.equal((ints - z) * s, q(big))


# ---------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------
def _roundtrip_through_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)  # default (weights_only) loading must accept the extra state


@pytest.mark.parametrize('kwargs', [
    dict(bits=8), dict(bits=4, num_channels=3, ch_axis=1), dict(bits=3, symmetric=True),
    dict(bits=2, num_channels=3, ch_axis=1, init='minmax', symmetric=True, signed=False)])
def test_state_dict_round_trip_bit_exact(kwargs):
    torch.manual_seed(5)
    x = torch.randn(4, 3, 6, 6) * 2 + 0.3
    q1 = UniformQuantizer(num_candidates=20, **kwargs)
    q1.init_range(x)
    sd = q1.state_dict()
    assert set(sd) == {'scale', 'zero_point', '_extra_state'}
    assert sd['_extra_state'] == {'initialized': True, 'bits': kwargs['bits'], 'grid': (q1.qmin, q1.qmax)}
    q2 = UniformQuantizer(num_candidates=20, **kwargs)
    with pytest.raises(RuntimeError):
        q2(x)  # fresh: not usable before loading
    q2.load_state_dict(_roundtrip_through_bytes(sd))
    assert q2.initialized
    assert torch.equal(q2.scale, q1.scale) and torch.equal(q2.zero_point, q1.zero_point)
    assert torch.equal(q2(x), q1(x))


def test_state_dict_of_uninitialised_quantizer_stays_uninitialised():
    sd = UniformQuantizer(bits=8).state_dict()
    q = UniformQuantizer(bits=8)
    q.initialized = True  # stale flag must be overwritten by the checkpoint
    q.load_state_dict(sd)
    assert not q.initialized


def test_loading_state_with_mismatched_bits_raises():
    q8 = UniformQuantizer(bits=8)
    q8.init_range(torch.randn(100))
    q4 = UniformQuantizer(bits=4)
    with pytest.raises(ValueError, match='8-bit'):
        q4.load_state_dict(q8.state_dict())
    assert not q4.initialized


def test_loading_per_channel_state_into_wrong_channel_count_raises():
    q = UniformQuantizer(bits=4, num_channels=3)
    q.init_range(torch.randn(3, 10))
    with pytest.raises(RuntimeError, match='size mismatch'):
        UniformQuantizer(bits=4, num_channels=4).load_state_dict(q.state_dict())


def test_extra_repr_mentions_configuration():
    r = repr(UniformQuantizer(bits=4, num_channels=8, ch_axis=0, symmetric=True, init='minmax'))
    assert 'bits=4' in r and 'per-channel(axis=0)' in r and 'sym' in r and 'init=minmax' in r
