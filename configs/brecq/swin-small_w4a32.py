# BRECQ W4A32 on mmpretrain Swin-S (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py); transformer units and quantizers: quant_cfg.transformer
# defaults (README, "Transformers"). Weights only: every activation, the attention matmul operands
# included, stays float.
_base_ = ['mmpretrain::swin_transformer/swin-small_16xb64_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/swin-transformer/convert/swin_small_patch4_window7_224-cc7a01c9.pth'
quant_cfg = dict(w_bits=4, a_bits=None)  # activations stay float
