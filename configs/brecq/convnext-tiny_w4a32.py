# BRECQ W4A32 on mmpretrain convnext-tiny (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
# Units: 18 ConvNeXtBlock; LayerNorm, GELU and the layer scale stay float.
_base_ = ['mmpretrain::convnext/convnext-tiny_32xb128_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/convnext/convnext-tiny_32xb128_in1k_20221207-998cf3e9.pth'
quant_cfg = dict(w_bits=4, a_bits=None)  # activations stay float
