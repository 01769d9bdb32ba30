# The transformer model of the embedded demo: a small DeiT-style ViT on scikit-learn's digits
# (mmbrecq.DigitsDataset, 1437 train / 360 test images, 32x32x3, no download). Same data,
# pipeline and runtime as the ResNet demo (digits_resnet_float.py); only the model and the
# schedule differ. Train with `tools/train_digits.py --model vit`, which writes
# checkpoints/digits_vit_float.pth.
_base_ = ['./digits_resnet_float.py']

# ---------------------------------------------------------------- model
# patch 4 on 32x32: 64 patch tokens + the class token; 4 layers, width 64, 4 heads of 16,
# MLP ratio 4 (DeiT's shape, scaled down): 0.2 M parameters, 0.8 MB of float32 weights.
model = dict(  # the ResNet demo's classifier and data preprocessor, another backbone and head
    backbone=dict(
        _delete_=True,
        type='VisionTransformer',
        arch=dict(embed_dims=64, num_layers=4, num_heads=4, feedforward_channels=256),
        img_size=32,
        patch_size=4,
        drop_rate=0.0,
        drop_path_rate=0.1,
        out_type='cls_token'),
    neck=None,
    head=dict(
        _delete_=True,
        type='VisionTransformerClsHead',
        num_classes=10,
        in_channels=64,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        topk=(1, )))

# ---------------------------------------------------------------- schedule
# ViTs need more epochs than the ResNet on 1437 images (no convolutional prior)
max_epochs = 60
optim_wrapper = dict(
    _delete_=True,
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                       custom_keys={'.cls_token': dict(decay_mult=0.0), '.pos_embed': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 5, eta_min=1e-5, by_epoch=True, begin=5,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=10)
