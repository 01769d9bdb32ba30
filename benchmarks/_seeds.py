"""Mean and spread over seeds, and the tie rule every benchmark table uses.

The spread is half the min-max range over seeds (0 for one seed); two rows whose means
differ by less than the larger of their spreads are a tie (reported as one, never as a
win), as are equal means.
"""


def mean_spread(values):
    """``(mean, spread)`` of per-seed values."""
    values = list(values)
    return sum(values) / len(values), (max(values) - min(values)) / 2


def compare(a, b, higher_is_better):
    """``a`` against ``b`` (each ``(mean, spread)``): ``'better'``, ``'worse'`` or ``'tie'``."""
    diff = a[0] - b[0]
    if diff == 0 or abs(diff) < max(a[1], b[1]):
        return 'tie'
    return 'better' if (diff > 0) == higher_is_better else 'worse'


def verdict(values, ref, higher_is_better):
    """:func:`compare` of two lists of per-seed values."""
    return compare(mean_spread(values), mean_spread(ref), higher_is_better)


def cell(values, digits):
    """``'mean ± spread'`` of per-seed values."""
    m, s = mean_spread(values)
    return f'{m:.{digits}f} ± {s:.{digits}f}'
