"""Range initialisation: min-max and the (vectorised) Lp-error search."""
import pytest
import torch

from mmbrecq.quantizers.functional import fake_quant, lp_error, qparams_from_range
from mmbrecq.quantizers.range_search import lp_search_range, minmax_range

P = 2.4


def _grid(bits, symmetric):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def _quant_error(x, lo, hi, qmin, qmax, symmetric, ch_axis=None):
    """Lp(2.4) error of quantizing ``x`` with the grid built from ``[lo, hi]`` (per channel)."""
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric)
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        scale, zp = scale.view(shape), zp.view(shape)
    xq = fake_quant(x, scale, zp, qmin, qmax)
    if ch_axis is None:
        return lp_error(x, xq, P)
    dims = [d for d in range(x.dim()) if d != ch_axis]
    return (x - xq).abs().pow(P).sum(dim=dims)


def _heavy_tailed(n, seed, outliers=(15., -12., 20.)):
    """Laplace / Student-t(4) mixture plus a few outliers far out in the tails."""
    g = torch.Generator().manual_seed(seed)
    lap = torch.empty(n).exponential_(generator=g) * torch.sign(torch.rand(n, generator=g) - 0.5)
    normal = torch.randn(n, generator=g)
    chi2 = torch.randn(n, 4, generator=g).pow(2).sum(1)
    t4 = normal / (chi2 / 4).sqrt()
    x = torch.where(torch.rand(n, generator=g) < 0.5, t4, lap)
    k = len(outliers)
    x[torch.randperm(n, generator=g)[:k]] = torch.tensor(outliers)
    return x


# ---------------------------------------------------------------------------------------
# min-max
# ---------------------------------------------------------------------------------------
def test_minmax_range_per_tensor_and_per_channel():
    x = torch.tensor([[[1., -2.], [3., 0.5]], [[-7., 4.], [0., 2.]]])  # (2, 2, 2)
    lo, hi = minmax_range(x)
    assert lo.dim() == 0 and lo.item() == -7. and hi.item() == 4.
    lo, hi = minmax_range(x, ch_axis=0)
    assert torch.equal(lo, torch.tensor([-2., -7.])) and torch.equal(hi, torch.tensor([3., 4.]))
    lo, hi = minmax_range(x, ch_axis=1)
    assert torch.equal(lo, torch.tensor([-7., 0.])) and torch.equal(hi, torch.tensor([4., 3.]))
    lo, hi = minmax_range(x, ch_axis=2)
    assert torch.equal(lo, torch.tensor([-7., -2.])) and torch.equal(hi, torch.tensor([3., 4.]))


# ---------------------------------------------------------------------------------------
# Lp search beats min-max on heavy-tailed data
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [2, 3, 4])
@pytest.mark.parametrize('symmetric', [False, True])
def test_lp_search_beats_minmax_per_tensor_heavy_tailed(bits, symmetric):
    torch.manual_seed(bits)
    x = _heavy_tailed(2000, seed=bits)
    qmin, qmax = _grid(bits, symmetric)
    lo_mm, hi_mm = minmax_range(x)
    lo, hi = lp_search_range(x, qmin, qmax, symmetric, num_candidates=50)
    err_mm = _quant_error(x, lo_mm, hi_mm, qmin, qmax, symmetric)
    err_lp = _quant_error(x, lo, hi, qmin, qmax, symmetric)
    # with outliers ~10x the bulk, clipping them wins by a wide margin (measured: 0.38-0.61)
    assert err_lp < 0.75 * err_mm, (err_lp, err_mm)
    # the chosen range is a shrink of the min-max range, strictly inside it
    assert hi < hi_mm and lo > lo_mm


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_lp_search_beats_minmax_per_channel_heavy_tailed(bits):
    torch.manual_seed(10 + bits)
    # conv-weight shaped Laplace/Student-t mixture, a different scale per channel, outliers in some
    # (kept to 2000 elements: small tensors stay single-threaded, fast on a busy 2-core machine)
    w = torch.stack([_heavy_tailed(20 * 5 * 5, seed=100 * bits + c, outliers=(15., ) * (c % 2))
                     for c in range(4)]).view(4, 20, 5, 5)
    w = w * torch.linspace(0.05, 2.0, 4).view(4, 1, 1, 1)
    qmin, qmax = _grid(bits, False)
    lo_mm, hi_mm = minmax_range(w, ch_axis=0)
    lo, hi = lp_search_range(w, qmin, qmax, False, ch_axis=0, num_candidates=50)
    assert lo.shape == (4, ) and hi.shape == (4, )
    err_mm = _quant_error(w, lo_mm, hi_mm, qmin, qmax, False, ch_axis=0)
    err_lp = _quant_error(w, lo, hi, qmin, qmax, False, ch_axis=0)
    # never worse per channel (c = 1 is a candidate), clearly better in total
    assert (err_lp <= err_mm * (1 + 1e-6)).all()
    # measured totals: 0.50 / 0.63 / 0.83 at 2 / 3 / 4 bits
    assert err_lp.sum() < {2: 0.6, 3: 0.75, 4: 0.9}[bits] * err_mm.sum(), (err_lp, err_mm)


def test_lp_search_returns_best_candidate():
    """The returned range is ``c*[min, max]`` for a candidate ``c``, and no candidate is better."""
    torch.manual_seed(0)
    x = _heavy_tailed(1500, seed=7)
    qmin, qmax, n = 0, 7, 40
    lo, hi = lp_search_range(x, qmin, qmax, False, num_candidates=n)
    lo0, hi0 = minmax_range(x)
    errs = torch.stack([
        _quant_error(x, lo0 * (1 - i / n), hi0 * (1 - i / n), qmin, qmax, False) for i in range(n)])
    best = int(torch.argmin(errs))
    c = 1 - best / n
    assert torch.equal(lo, lo0 * c) and torch.equal(hi, hi0 * c)
    assert _quant_error(x, lo, hi, qmin, qmax, False) <= errs.min()


def test_lp_search_candidates_go_down_to_one_over_n():
    # many values in [0, 1] and one moderate outlier at 10: at 2 bits the bulk's rounding error
    # dominates, so the smallest candidate c = 1/n (range [0, 1]) wins
    x = torch.cat([torch.linspace(0, 1, 10000), torch.tensor([10.])])
    lo, hi = lp_search_range(x, 0, 3, False, num_candidates=10)
    assert hi.item() == pytest.approx(1.0, rel=1e-6) and lo.item() == 0.0
    # at 8 bits the outlier's clipping error dominates: c = 1 (min-max) wins
    lo, hi = lp_search_range(x, 0, 255, False, num_candidates=10)
    assert hi.item() == 10.0


# ---------------------------------------------------------------------------------------
# vectorised per-channel search == per-tensor search channel by channel
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('bits,symmetric', [(4, False), (2, False), (3, True), (8, True)])
def test_vectorised_per_channel_equals_naive_loop_weights(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(12, 6, 3, 3) * torch.rand(12, 1, 1, 1) * 2
    w[3] = w[3].abs()        # all-positive channel
    w[5] = -w[5].abs()       # all-negative channel
    w[7, 0, 0, 0] = 9.       # an outlier
    w[9] = 0.                # dead channel
    qmin, qmax = _grid(bits, symmetric)
    lo, hi = lp_search_range(w, qmin, qmax, symmetric, ch_axis=0, num_candidates=30)
    for c in range(w.shape[0]):
        lo_c, hi_c = lp_search_range(w[c], qmin, qmax, symmetric, ch_axis=None, num_candidates=30)
        assert torch.equal(lo[c], lo_c), (c, lo[c], lo_c)
        assert torch.equal(hi[c], hi_c), (c, hi[c], hi_c)


@pytest.mark.parametrize('ch_axis', [1, 3, -1])
def test_vectorised_per_channel_equals_naive_loop_other_axes(ch_axis):
    torch.manual_seed(5)
    x = torch.randn(3, 5, 4, 6) * torch.rand(1, 5, 1, 6) * 3
    qmin, qmax = _grid(4, False)
    lo, hi = lp_search_range(x, qmin, qmax, False, ch_axis=ch_axis, num_candidates=25)
    assert lo.shape == (x.shape[ch_axis], )
    for c in range(x.shape[ch_axis]):
        lo_c, hi_c = lp_search_range(x.select(ch_axis, c), qmin, qmax, False, num_candidates=25)
        assert torch.equal(lo[c], lo_c) and torch.equal(hi[c], hi_c)


def test_per_channel_search_differs_from_per_tensor():
    # guards against a per-channel call silently collapsing to one range
    torch.manual_seed(0)
    w = torch.randn(4, 50) * torch.tensor([0.1, 1., 5., 20.]).view(4, 1)
    lo, hi = lp_search_range(w, 0, 15, False, ch_axis=0, num_candidates=20)
    assert len(set(hi.tolist())) == 4
    lo_t, hi_t = lp_search_range(w, 0, 15, False, num_candidates=20)
    assert lo_t.dim() == 0 and hi_t.dim() == 0


# ---------------------------------------------------------------------------------------
# subsampling of large inputs
# ---------------------------------------------------------------------------------------
def test_subsampling_is_fixed_stride_and_deterministic():
    torch.manual_seed(0)
    x = _heavy_tailed(10007, seed=3)
    max_el = 1000  # stride = ceil(10007 / 1000) = 11 -> 910 elements
    a = lp_search_range(x, 0, 15, False, num_candidates=30, max_elements=max_el)
    torch.manual_seed(123)  # the global RNG must not matter
    b = lp_search_range(x, 0, 15, False, num_candidates=30, max_elements=max_el)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ref = lp_search_range(x[::11], 0, 15, False, num_candidates=30)
    assert torch.equal(a[0], ref[0]) and torch.equal(a[1], ref[1])
    # the subsampled search sees a different data set than the full one (x[1] is a dropped outlier)
    full_lo0, _ = minmax_range(x)
    sub_lo0, _ = minmax_range(x[::11])
    assert sub_lo0 > full_lo0


def test_subsampling_not_applied_at_or_below_limit():
    torch.manual_seed(1)
    x = torch.randn(2000)
    a = lp_search_range(x, 0, 15, False, num_candidates=20, max_elements=2000)
    b = lp_search_range(x, 0, 15, False, num_candidates=20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_subsampling_per_channel_equals_loop_on_strided_channels():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 40, 25)  # channel axis 1, 2000 elements per channel
    lo, hi = lp_search_range(x, 0, 7, False, ch_axis=1, num_candidates=20, max_elements=300)
    stride = -(-2000 // 300)  # 7
    for c in range(3):
        v = x.select(1, c).reshape(-1)[::stride]
        lo_c, hi_c = lp_search_range(v, 0, 7, False, num_candidates=20)
        assert torch.equal(lo[c], lo_c) and torch.equal(hi[c], hi_c)


def test_lp_search_accepts_half_and_grad_inputs():
    torch.manual_seed(3)
    x = torch.randn(64, 16, requires_grad=True)
    lo, hi = lp_search_range(x, 0, 15, False, ch_axis=0, num_candidates=10)
    assert not lo.requires_grad and lo.dtype == torch.float32
    lo16, hi16 = lp_search_range(x.detach().half(), 0, 15, False, ch_axis=0, num_candidates=10)
    assert lo16.dtype == torch.float32
