# The paper's BRECQ recipe for ImageNet classifiers, shared by configs/brecq/*: 1024
# calibration images from the training set (with its augmentation), 20k iterations per
# unit, batch 32, lambda 0.01, beta 20->2 after a 20% warm-up, Fisher-weighted block
# output loss, first/last layer (and the last layer's input) 8-bit.
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
quant_cfg = dict(
    w_bits=4,
    a_bits=4,
    keep_8bit=['first', 'last'],
    calib=dict(num_samples=1024, batch_size=32, split='train'),
    recon=dict(type='BlockReconstructor', iters=20000, batch_size=32, lam=0.01, b_range=(20, 2),
               warmup=0.2, loss='fisher_diag', act_lr=4e-5, input_mix='quant'),
)
