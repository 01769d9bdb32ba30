# The transformer demo: BRECQ W4A4 on the small DeiT-style ViT trained on scikit-learn's
# digits (configs/_base_/digits_vit_float.py); CPU-sized recipe of the ResNet demo.
_base_ = ['../_base_/digits_vit_float.py']
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = 'checkpoints/digits_vit_float.pth'

quant_cfg = dict(
    w_bits=4,
    a_bits=4,
    keep_8bit=['first', 'last'],
    calib=dict(num_samples=512, batch_size=64, split='train'),
    recon=dict(type='BlockReconstructor', iters=1000, batch_size=32, lam=0.01, b_range=(20, 2),
               warmup=0.2, loss='fisher_diag', act_lr=4e-5, input_mix='quant'),
)
