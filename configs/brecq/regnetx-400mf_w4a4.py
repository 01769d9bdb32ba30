# BRECQ W4A4 on mmpretrain regnetx-400mf (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
_base_ = ['mmpretrain::regnet/regnetx-400mf_8xb128_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/regnet/regnetx-400mf_8xb128_in1k_20211213-89bfc226.pth'
quant_cfg = dict(w_bits=4, a_bits=4)
