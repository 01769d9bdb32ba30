"""Quantization range initialisation: min-max, and the Lp-error search of BRECQ.

The search tries shrunk versions ``[c*min, c*max]`` of the observed range and keeps,
per channel, the candidate with the lowest ``sum |x - Q(x)|^p`` (p = 2.4 in the paper).
The reference code loops over channels in Python; here every candidate is evaluated
for all channels at once (a loop over ~100 candidates, not over 26k channels).

Both take an optional ``reducer``: the one place where several processes that each hold
a part of the data agree on the statistics one process would compute on the whole
(:class:`mmbrecq.utils.dist.ShardReducer`). Without it (one process) every reduction is
the identity, so the search loop exists once for both cases.
"""
import torch

from .functional import lp_error, qparams_from_range


class LocalReducer:
    """The statistics of one process holding all the data: reductions are the identity, and
    large inputs are subsampled with a fixed stride (deterministic, cheap)."""

    def subsample(self, v, x, ch_axis, max_elements):
        """``v`` (the (C, K) channel view of ``x``) thinned to at most ``max_elements`` per row."""
        if v.shape[1] > max_elements:
            return v[:, ::-(-v.shape[1] // max_elements)]
        return v

    def min_(self, t):
        return t

    def max_(self, t):
        return t

    def sum_(self, t):
        return t


def channel_view(x: torch.Tensor, ch_axis):
    """``x`` as (C, K) with channels first, or (1, K) for per-tensor statistics."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)


def _row_extrema(v, reducer):
    """Per-row min and max of ``v`` reduced over processes (+/-inf for an empty local part)."""
    if v.shape[1]:
        lo, hi = v.min(dim=1).values, v.max(dim=1).values
    else:
        lo = torch.full(v.shape[:1], float('inf'), device=v.device)
        hi = torch.full(v.shape[:1], -float('inf'), device=v.device)
    return reducer.min_(lo), reducer.max_(hi)


def _per_tensor(lo, hi, ch_axis):
    return (lo[0], hi[0]) if ch_axis is None else (lo, hi)


def minmax_range(x: torch.Tensor, ch_axis=None, reducer=None):
    """Per-channel (or per-tensor, ``ch_axis=None``) min and max, shaped (C,) or ()."""
    lo, hi = _row_extrema(channel_view(x.detach(), ch_axis), reducer or LocalReducer())
    return _per_tensor(lo, hi, ch_axis)


def lp_search_range(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, ch_axis=None,
                    p: float = 2.4, num_candidates: int = 100, max_elements: int = 1 << 18, reducer=None):
    """Range ``(lo, hi)`` minimising the Lp quantization error, searched over shrink factors.

    Candidates are ``c * [min, max]`` for ``c`` in ``1, 1 - 1/n, ..., 1/n`` (``n`` =
    ``num_candidates``). All channels are searched together. Very large per-tensor inputs
    (activations) are subsampled with a fixed stride to at most ``max_elements`` elements
    per channel, which keeps the search deterministic and cheap. Per channel, the first
    candidate with the smallest error wins (non-finite errors never win).
    """
    reducer = reducer or LocalReducer()
    v = reducer.subsample(channel_view(x.detach().float(), ch_axis), x, ch_axis, max_elements)
    lo0, hi0 = _row_extrema(v, reducer)
    factors = [1.0 - i / num_candidates for i in range(num_candidates)]
    errs = []
    for c in factors:
        scale, zp = qparams_from_range(lo0 * c, hi0 * c, qmin, qmax, symmetric)
        s, z = scale[:, None], zp[:, None]
        xq = (torch.clamp(torch.round(v / s) + z, qmin, qmax) - z) * s
        errs.append(lp_error(v, xq, p, dim=1))
    err = reducer.sum_(torch.stack(errs))              # (candidates, channels): one reduction
    best = torch.nan_to_num(err, nan=float('inf')).argmin(dim=0)  # argmin: the first minimum
    c = torch.tensor(factors, dtype=lo0.dtype, device=lo0.device)[best]
    return _per_tensor(lo0 * c, hi0 * c, ch_axis)
