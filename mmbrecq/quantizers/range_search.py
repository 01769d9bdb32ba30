"""Quantization range initialisation: min-max, and the Lp-error search of BRECQ.

The search tries shrunk versions ``[c*min, c*max]`` of the observed range and keeps,
per channel, the candidate with the lowest ``sum |x - Q(x)|^p`` (p = 2.4 in the paper).
The reference code loops over channels in Python; here every candidate is evaluated
for all channels at once (a loop over ~100 candidates, not over 26k channels).
"""
import torch

from .functional import lp_error, qparams_from_range


def _channel_view(x: torch.Tensor, ch_axis):
    """``x`` as (C, K) with channels first, or (1, K) for per-tensor statistics."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)


def minmax_range(x: torch.Tensor, ch_axis=None):
    """Per-channel (or per-tensor, ``ch_axis=None``) min and max, shaped (C,) or ()."""
    v = _channel_view(x.detach(), ch_axis)
    lo, hi = v.min(dim=1).values, v.max(dim=1).values
    if ch_axis is None:
        return lo[0], hi[0]
    return lo, hi


def lp_search_range(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, ch_axis=None,
                    p: float = 2.4, num_candidates: int = 100, max_elements: int = 1 << 18):
    """Range ``(lo, hi)`` minimising the Lp quantization error, searched over shrink factors.

    Candidates are ``c * [min, max]`` for ``c`` in ``1, 1 - 1/n, ..., 1/n`` (``n`` =
    ``num_candidates``). All channels are searched together. Very large per-tensor inputs
    (activations) are subsampled with a fixed stride to at most ``max_elements`` elements
    per channel, which keeps the search deterministic and cheap.
    """
    v = _channel_view(x.detach().float(), ch_axis)
    if v.shape[1] > max_elements:
        stride = -(-v.shape[1] // max_elements)
        v = v[:, ::stride]
    lo0, hi0 = v.min(dim=1).values, v.max(dim=1).values
    best_err = torch.full_like(lo0, float('inf'))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(num_candidates):
        c = 1.0 - i / num_candidates
        lo, hi = lo0 * c, hi0 * c
        scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric)
        s, z = scale[:, None], zp[:, None]
        xq = (torch.clamp(torch.round(v / s) + z, qmin, qmax) - z) * s
        err = lp_error(v, xq, p, dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    if ch_axis is None:
        return best_lo[0], best_hi[0]
    return best_lo, best_hi
