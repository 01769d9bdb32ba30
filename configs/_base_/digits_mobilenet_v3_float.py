# The demo's second float model: mmpretrain's MobileNetV3 (arch 'small_050': SE branches,
# hard-swish / hard-sigmoid, depthwise 3x3 and 5x5 convs) on scikit-learn's digits.
# Same data, preprocessing and runtime as the ResNet demo model (digits_resnet_float.py);
# train with `tools/train_digits.py --model mobilenet_v3`, which writes
# checkpoints/digits_mobilenet_v3_float.pth.
_base_ = ['./digits_resnet_float.py']

# 32x32 inputs: the five stride-2 stages end at 1x1, like 224 -> 7 for ImageNet; the
# digits are 8x8 scans, so the 8x8 maps after the stem and the first block hold them whole.
model = dict(
    backbone=dict(
        _delete_=True,
        type='MobileNetV3',
        arch='small_050',
        # BN momentum 0.1 instead of mmpretrain's 0.01: with ~700 training iterations the
        # running statistics (what BN folding uses) must settle
        norm_cfg=dict(type='BN', eps=0.001, momentum=0.1)),
    head=dict(
        _delete_=True,
        type='StackedLinearClsHead',  # as mmpretrain's MobileNetV3 configs: Linear -> HSwish -> Linear
        num_classes=10,
        in_channels=288,  # the last conv of 'small_050'
        mid_channels=[128],
        dropout_rate=0.2,
        act_cfg=dict(type='HSwish'),
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

max_epochs = 30
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5, by_epoch=True,
         begin=1, end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=10)
