# BRECQ W6A6 on mmpretrain mobilenet-v3-large (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
# Units: 15 InvertedResidual(SE) blocks; hard-swish outputs are signed (asymmetric activation grids).
_base_ = ['mmpretrain::mobilenet_v3/mobilenet-v3-large_8xb128_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/mobilenet_v3/mobilenet-v3-large_8xb128_in1k_20221114-0ed9ed9a.pth'
# W6A6 besides W4A4: 4-bit activations cost MobileNetV3 the most (digits MobileNetV3, README
# Benchmarks, BRECQ top-1: float 99.17, W4A6 98.61, W6A4 96.94, W6A6 98.89); not measured on ImageNet
quant_cfg = dict(w_bits=6, a_bits=6)
