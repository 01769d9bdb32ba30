# The transformer demo: BRECQ W6A6 on the small DeiT-style ViT trained on scikit-learn's
# digits (configs/_base_/digits_vit_float.py); CPU-sized recipe of the ResNet demo.
_base_ = ['../_base_/digits_vit_float.py', '../_base_/brecq_digits.py']
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = 'checkpoints/digits_vit_float.pth'
quant_cfg = dict(w_bits=6, a_bits=6)
