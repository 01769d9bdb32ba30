# The paper's BRECQ recipe for ImageNet classifiers, shared by configs/brecq/*. It is
# quant_cfg's defaults (mmbrecq/config/quant_cfg.py): 1024 calibration images from the
# training set (with its augmentation), 20k iterations per unit, batch 32, lambda 0.01,
# beta 20->2 after a 20% warm-up, Fisher-weighted block output loss, first/last layer
# (and the last layer's input) 8-bit. Leaf configs set the bits and what differs.
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
quant_cfg = dict(w_bits=4, a_bits=4)
