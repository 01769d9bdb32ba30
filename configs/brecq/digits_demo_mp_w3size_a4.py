# Mixed-precision BRECQ on the digits demo model: per-layer weight bits from {2, 4, 8}
# searched (genetic search over per-unit Fisher sensitivities) under the weight size of
# uniform W3 (first/last layer 8-bit as keep_8bit, in the budget too), activations 4-bit.
# w_bits=3 is the uniform baseline: the nearest-rounding evaluation and the Fisher weights
# of the sensitivity use it before the searched bit map is applied.
_base_ = ['./digits_demo_w4a4.py']
quant_cfg = dict(
    w_bits=3,
    a_bits=4,
    mixed_precision=dict(
        type='GeneticSearcher',
        budget=dict(size_mb='uniform_w3'),
        candidates=(2, 4, 8),
        sensitivity=dict(iters=0, fisher_weight='raw'),
        seed=0,
    ),
)
