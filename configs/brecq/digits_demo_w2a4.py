# The embedded demo at W2A4 (see digits_demo_w4a4.py).
_base_ = ['./digits_demo_w4a4.py']
quant_cfg = dict(w_bits=2, a_bits=4)
