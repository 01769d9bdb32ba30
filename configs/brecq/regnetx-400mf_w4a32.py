# BRECQ W4A32 on mmpretrain regnetx-400mf (ImageNet-1k), the paper's recipe:
# 1024 calibration images from the training set (training augmentation), 20k iterations
# per unit, batch 32, lambda 0.01, first/last layer (and the last layer's input) 8-bit.
_base_ = 'mmpretrain::regnet/regnetx-400mf_8xb128_in1k.py'
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/regnet/regnetx-400mf_8xb128_in1k_20211213-89bfc226.pth'

quant_cfg = dict(
    w_bits=4,
    a_bits=None,  # activations stay float
    keep_8bit=['first', 'last'],
    calib=dict(num_samples=1024, batch_size=32, split='train'),
    recon=dict(type='BlockReconstructor', iters=20000, batch_size=32, lam=0.01, b_range=(20, 2),
               warmup=0.2, loss='fisher_diag', act_lr=4e-5, input_mix='quant'),
)
