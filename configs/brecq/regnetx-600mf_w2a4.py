# BRECQ W2A4 on mmpretrain regnetx-600mf (ImageNet-1k), the paper's recipe:
# 1024 calibration images from the training set (training augmentation), 20k iterations
# per unit, batch 32, lambda 0.01, first/last layer (and the last layer's input) 8-bit.
# mmpretrain ships no RegNetX-600MF weights: pass your float checkpoint (e.g. converted
# from pycls) with --checkpoint. The architecture is pycls' RegNetX-600MF.
_base_ = 'mmpretrain::regnet/regnetx-400mf_8xb128_in1k.py'
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = None  # --checkpoint PATH
model = dict(backbone=dict(arch=dict(_delete_=True, w0=48, wa=36.97, wm=2.24, group_w=24, depth=16, bot_mul=1.0)),
             head=dict(in_channels=528))

quant_cfg = dict(
    w_bits=2,
    a_bits=4,
    keep_8bit=['first', 'last'],
    calib=dict(num_samples=1024, batch_size=32, split='train'),
    recon=dict(type='BlockReconstructor', iters=20000, batch_size=32, lam=0.01, b_range=(20, 2),
               warmup=0.2, loss='fisher_diag', act_lr=4e-5, input_mix='quant'),
)
