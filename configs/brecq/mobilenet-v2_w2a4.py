# BRECQ W2A4 on mmpretrain mobilenet-v2 (ImageNet-1k), the paper's recipe:
# 1024 calibration images from the training set (training augmentation), 20k iterations
# per unit, batch 32, lambda 0.1, first/last layer (and the last layer's input) 8-bit.
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/mobilenet_v2/mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth'

quant_cfg = dict(
    w_bits=2,
    a_bits=4,
    keep_8bit=['first', 'last'],
    calib=dict(num_samples=1024, batch_size=32, split='train'),
    recon=dict(type='BlockReconstructor', iters=20000, batch_size=32, lam=0.1, b_range=(20, 2),
               warmup=0.2, loss='fisher_diag', act_lr=4e-5, input_mix='quant'),
)
