# BRECQ W4A4 on mmpretrain efficientnet-b0 (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
# Units: 16 InvertedResidual(SE) blocks; Conv2dAdaptivePadding keeps its TensorFlow-style padding.
_base_ = ['mmpretrain::efficientnet/efficientnet-b0_8xb32_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/efficientnet/efficientnet-b0_3rdparty_8xb32_in1k_20220119-a7e2a0b1.pth'
quant_cfg = dict(w_bits=4, a_bits=4)
