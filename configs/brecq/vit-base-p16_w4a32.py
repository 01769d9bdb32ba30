# BRECQ W4A32 on mmpretrain ViT-B/16 (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py); transformer units and quantizers: quant_cfg.transformer
# defaults (README, "Transformers"). Weights only: every activation, the attention matmul operands
# included, stays float.
_base_ = ['mmpretrain::vision_transformer/vit-base-p16_32xb128-mae_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/vit/vit-base-p16_pt-32xb128-mae_in1k_20220623-4c544545.pth'
quant_cfg = dict(w_bits=4, a_bits=None)  # activations stay float
