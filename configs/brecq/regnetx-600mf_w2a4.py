# BRECQ W2A4 on mmpretrain regnetx-600mf (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
# mmpretrain ships no RegNetX-600MF weights: pass your float checkpoint (e.g. converted
# from pycls) with --checkpoint. The architecture is pycls' RegNetX-600MF.
_base_ = ['mmpretrain::regnet/regnetx-400mf_8xb128_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = None  # --checkpoint PATH
model = dict(backbone=dict(arch=dict(_delete_=True, w0=48, wa=36.97, wm=2.24, group_w=24, depth=16, bot_mul=1.0)),
             head=dict(in_channels=528))
quant_cfg = dict(w_bits=2, a_bits=4)
