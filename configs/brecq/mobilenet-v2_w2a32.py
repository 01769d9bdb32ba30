# BRECQ W2A32 on mmpretrain mobilenet-v2 (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
_base_ = ['mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/mobilenet_v2/mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth'
# MobileNetV2: lambda 0.1 (the paper's setting for it)
quant_cfg = dict(w_bits=2, a_bits=None, recon=dict(lam=0.1))  # activations stay float
