# BRECQ W4A32 on mmpretrain DeiT-B (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py); transformer units and quantizers: quant_cfg.transformer
# defaults (README, "Transformers"). Weights only: every activation, the attention matmul operands
# included, stays float.
_base_ = ['mmpretrain::deit/deit-base_16xb64_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/deit/deit-base_3rdparty_pt-16xb64_in1k_20211124-6f40c188.pth'
quant_cfg = dict(w_bits=4, a_bits=None)  # activations stay float
