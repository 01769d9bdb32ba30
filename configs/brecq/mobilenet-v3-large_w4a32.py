# BRECQ W4A32 on mmpretrain mobilenet-v3-large (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
# Units: 15 InvertedResidual(SE) blocks; hard-swish outputs are signed (asymmetric activation grids).
_base_ = ['mmpretrain::mobilenet_v3/mobilenet-v3-large_8xb128_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/mobilenet_v3/mobilenet-v3-large_8xb128_in1k_20221114-0ed9ed9a.pth'
quant_cfg = dict(w_bits=4, a_bits=None)  # activations stay float
