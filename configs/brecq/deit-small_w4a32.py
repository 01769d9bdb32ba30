# BRECQ W4A32 on mmpretrain DeiT-S (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py); transformer units and quantizers: quant_cfg.transformer
# defaults (README, "Transformers"). Weights only: every activation, the attention matmul operands
# included, stays float.
_base_ = ['mmpretrain::deit/deit-small_4xb256_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/deit/deit-small_pt-4xb256_in1k_20220218-9425b9bb.pth'
quant_cfg = dict(w_bits=4, a_bits=None)  # activations stay float
