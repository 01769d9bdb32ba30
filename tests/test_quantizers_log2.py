"""Log2 / log-sqrt2 quantizer of post-softmax values."""
import math

import pytest
import torch

from mmbrecq.quantizers import Log2Quantizer, LSQQuantizer
from mmbrecq.quantizers.range_search import LocalReducer
from mmbrecq.registry import QUANTIZERS


def _softmax(seed=0, shape=(4, 2, 65, 65), temperature=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * temperature, dim=-1)


def test_registered():
    assert QUANTIZERS.get('Log2Quantizer') is Log2Quantizer


@pytest.mark.parametrize('base,k', [('sqrt2', 2), ('2', 1)])
def test_grid_values(base, k):
    q = Log2Quantizer(bits=3, base=base)
    q.init_range(torch.tensor([1.0]))
    assert float(q.scale) == 1.0
    levels = [2.0 ** (-c / k) for c in range(q.qmax)]  # 7 non-zero levels, code 7 is zero
    x = torch.tensor(levels + [0.0, -0.5])
    out = q(x)
    torch.testing.assert_close(out, torch.tensor(levels + [0.0, 0.0]))
    assert len(torch.unique(q(torch.rand(10000)))) <= 2**3  # really 3 bits: 8 values incl. 0
    codes = q.integer_repr(x)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert codes[-1] == codes[-2] == q.qmax
    # far below the smallest level: zero; above delta: clamped to delta
    assert q(torch.tensor([1e-9]))[0] == 0 and q(torch.tensor([3.0]))[0] == 1.0


def test_rounding_in_log_domain():
    q = Log2Quantizer(bits=4, base='2')
    q.init_range(torch.tensor([1.0]))
    # 0.3: log2 = -1.74 -> code 2 -> 0.25; 0.36: log2 = -1.47 -> code 1 -> 0.5
    torch.testing.assert_close(q(torch.tensor([0.3, 0.36])), torch.tensor([0.25, 0.5]))


def test_beats_uniform_on_softmax_at_4_bits():
    """The reason it exists: attention probabilities are power-law distributed."""
    x = _softmax()
    log_q = Log2Quantizer(bits=4)
    log_q.init_range(x)
    uni = LSQQuantizer(bits=4, init='lp')
    uni.init_range(x)
    with torch.no_grad():
        err_log = (log_q(x) - x).pow(2).sum()
        err_uni = (uni(x) - x).pow(2).sum()
        # the attention output (softmax . V) suffers less, too
        v = torch.randn(4, 2, 65, 16, generator=torch.Generator().manual_seed(5))
        out_err_log = (log_q(x) @ v - x @ v).pow(2).sum()
        out_err_uni = (uni(x) @ v - x @ v).pow(2).sum()
    assert err_log < err_uni
    assert out_err_log < out_err_uni


def test_straight_through_gradient_and_calibration_flow():
    q = Log2Quantizer(bits=4)
    x = _softmax(shape=(2, 5, 5)).requires_grad_(True)
    with pytest.raises(RuntimeError, match='calibrate'):
        q(x)
    q.observing = True
    q(x.detach())
    q.observing = False
    assert q.initialized and 0 < float(q.scale) <= float(x.max()) + 1e-6
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    q.enabled = False
    assert q(x) is x


def test_state_dict_round_trip_and_bad_base():
    q = Log2Quantizer(bits=4)
    q.init_range(_softmax())
    q2 = Log2Quantizer(bits=4)
    q2.load_state_dict(q.state_dict())
    x = _softmax(seed=3)
    assert q2.initialized and torch.equal(q2(x), q(x))
    with pytest.raises(ValueError, match='base'):
        Log2Quantizer(bits=4, base='e')
    assert math.isclose(Log2Quantizer(bits=4, init='lp', p=2.4).codes_per_octave, 2.0)  # act_quantizer keys ok


def test_fused_forward_equals_the_plain_ops():
    q = Log2Quantizer(bits=4)
    x = _softmax(seed=7)
    q.init_range(x)
    with torch.no_grad():
        plain = q._values(x, q.scale)
    assert torch.equal(q(x), plain)
    x = x.clone().requires_grad_(True)
    out = q(x)
    assert torch.equal(out.detach(), plain)
    (out * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_sharded_range_init_uses_the_global_maximum():
    """Several processes: delta is the all-reduced maximum (here one process: the maximum)."""
    q = Log2Quantizer(bits=4)
    x = _softmax(seed=2)
    q.init_range(x, LocalReducer())  # a reducer: statistics combined over processes (here one)
    assert q.initialized and float(q.scale) == float(x.max())


@pytest.mark.parametrize('k', [2.0, 1.0])
def test_exp2_is_pow_on_every_grid_exponent(k):
    """The fused forward computes ``2^(-c/k)`` with exp2 in float32; the plain ops (and the
    export) with pow: the same floats for every code of every width."""
    e = torch.arange(1 << 16, dtype=torch.float32).div_(-k)
    assert torch.equal(torch.exp2(e), torch.pow(2.0, e))


def test_fused_forward_other_dtypes_and_eight_bits():
    """float64 keeps pow; at 8 bits (log-sqrt2) a non-positive input's code is below the top
    code, so it is zeroed by its own test."""
    for bits, dtype in ((4, torch.float64), (8, torch.float32), (8, torch.float64)):
        q = Log2Quantizer(bits=bits)
        x = torch.cat([_softmax(seed=9).reshape(-1), torch.tensor([0.0, -1.0, 1e-45, 3.0])]).to(dtype)
        q.init_range(x)
        out = q(x)
        assert torch.equal(out, q._values(x, q.scale.to(dtype)))
        assert out[-4] == 0 and out[-3] == 0 and out.dtype == dtype


@pytest.mark.parametrize('k', [2.0, 1.0])
def test_mantissa_thresholds_are_the_smallest_floats_above_the_boundaries(k):
    """Checked in 40-digit decimal arithmetic: ``t`` is above ``2^(-(j + 1/2) / k)`` and the float
    below ``t`` is under it."""
    from decimal import Decimal, getcontext

    from mmbrecq.quantizers.log2 import _mantissa_thresholds
    getcontext().prec = 40
    for j, t in enumerate(_mantissa_thresholds(k)):
        exact = Decimal(2)**(-(Decimal(j) + Decimal('0.5')) / Decimal(int(k)))
        below = torch.nextafter(t, torch.tensor(0.0))
        assert Decimal(float(t)) > exact > Decimal(float(below))


@pytest.mark.parametrize('k', [2.0, 1.0])
def test_exact_codes_round_the_true_logarithm(k):
    """The exponent/mantissa codes are ``round(-k log2 r)`` of the float ``r`` itself: compared
    with log2 in float64 (exact enough away from a boundary), they agree everywhere; the float32
    log2 formula (the ONNX form) disagrees at most next to a half-code boundary."""
    from mmbrecq.quantizers.log2 import exact_log_codes
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200000, generator=g).pow(6)
    codes = exact_log_codes(x, 1.0, k)
    t64 = -k * torch.log2(x.double().clamp_min(torch.finfo(torch.float32).tiny))
    assert torch.equal(codes.double(), torch.round(t64).clamp_min(0))
    t32 = -k * torch.log2(x.clamp_min(torch.finfo(torch.float32).tiny))
    differ = torch.round(t32).clamp_min(0) != codes
    assert bool(((t64[differ] - t64[differ].floor() - 0.5).abs() < 1e-5).all())
    print(f'float32 log2 misrounds {int(differ.sum())} of {x.numel()} codes')


def test_exact_codes_special_values():
    from mmbrecq.quantizers.log2 import exact_log_codes
    x = torch.tensor([1.0, 0.5, 0.0, -2.0, float('inf'), float('nan'), 4.0])
    codes = exact_log_codes(x, 1.0, 2.0)
    tiny_code = 2 * 126  # -2 log2(2^-126)
    assert codes[:5].tolist() == [0.0, 2.0, tiny_code, tiny_code, 0.0]
    assert codes[5].isnan() and codes[6] == 0
