# BRECQ W2A4 on mmpretrain resnet50 (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'
quant_cfg = dict(w_bits=2, a_bits=4)
