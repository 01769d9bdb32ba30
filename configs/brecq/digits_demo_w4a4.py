# The embedded demo: BRECQ W4A4 on a slim ResNet-18 trained on scikit-learn's digits.
# Runs on CPU in a few minutes: `make demo` (this config and digits_demo_w2a4.py).
_base_ = ['../_base_/digits_resnet_float.py', '../_base_/brecq_digits.py']
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = 'checkpoints/digits_resnet18_float.pth'
quant_cfg = dict(w_bits=4, a_bits=4)
