"""Mean and spread over seeds, and the tie rule the benchmark tables use.

The spread is half the min-max range over seeds; two rows whose means differ by less than
the larger of their spreads are a tie (reported as one, never as a win), as are equal means.
"""
import statistics


def mean_spread(values):
    values = list(values)
    return statistics.fmean(values), (max(values) - min(values)) / 2


def is_tie(a, b):
    """``a``, ``b``: lists of per-seed values."""
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    return ma == mb or abs(ma - mb) < max(sa, sb)


def cell(values, digits):
    m, s = mean_spread(values)
    return f'{m:.{digits}f} ± {s:.{digits}f}'


def verdict(values, ref, higher_is_better):
    """``'better'`` / ``'worse'`` / ``'tie'`` of ``values`` against ``ref`` (per-seed lists)."""
    if is_tie(values, ref):
        return 'tie'
    better = statistics.fmean(values) > statistics.fmean(ref)
    return 'better' if better == higher_is_better else 'worse'
