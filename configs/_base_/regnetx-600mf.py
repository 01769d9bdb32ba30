# pycls' RegNetX-600MF in mmpretrain (which ships the 400MF config, not this one): the
# 400MF config with the 600MF widths and depth.
_base_ = 'mmpretrain::regnet/regnetx-400mf_8xb128_in1k.py'
model = dict(backbone=dict(arch=dict(_delete_=True, w0=48, wa=36.97, wm=2.24, group_w=24, depth=16, bot_mul=1.0)),
             head=dict(in_channels=528))
