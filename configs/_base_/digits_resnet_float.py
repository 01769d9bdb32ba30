# The float model of the embedded demo: a slim ResNet-18 (CIFAR stem) on scikit-learn's
# digits (mmbrecq.DigitsDataset, 1437 train / 360 test images, 32x32x3, no download).
# Self-contained mmpretrain config (no _base_ files): train with tools/train_digits.py,
# which writes checkpoints/digits_resnet18_float.pth (~2.9 MB).
custom_imports = dict(imports=['mmbrecq.datasets'], allow_failed_imports=False)
default_scope = 'mmpretrain'

# ---------------------------------------------------------------- model
# stem/base channels 16 instead of 64: 0.70 M parameters, 2.8 MB of float32 weights.
# data_preprocessor lives inside `model` so that MODELS.build(cfg.model) alone (as the
# PTQ tools do) gets the normalisation too; the Runner would also merge a top-level one.
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ClsDataPreprocessor',
        num_classes=10,
        # grey digits repeated to 3 channels: mean/std of the 32x32 train split (0..255)
        mean=[77.94, 77.94, 77.94],
        std=[82.50, 82.50, 82.50],
        to_rgb=False),
    backbone=dict(
        type='ResNet_CIFAR',
        depth=18,
        stem_channels=16,
        base_channels=16,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch'),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=128,  # base_channels * 8 (BasicBlock, 4 stages)
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

# ---------------------------------------------------------------- data
dataset_type = 'mmbrecq.DigitsDataset'
train_pipeline = [
    # digits are not flip-invariant: shifts only (pad 2 px with 0 = background, crop back)
    dict(type='RandomCrop', crop_size=32, padding=2, pad_val=0),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='PackInputs')]

train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(type=dataset_type, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(type=dataset_type, split='test', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# ---------------------------------------------------------------- schedule
# 10 epochs x 23 iterations of batch 64: ~2 min on 2 idle CPU cores, ~99 % test top-1.
# (AdamW: SGD(lr=0.1, momentum=0.9) needs many more epochs here: 64 % after 4 epochs,
# against 91 % for AdamW.)
max_epochs = 10
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=6e-3, betas=(0.9, 0.999), weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5, by_epoch=True,
         begin=1, end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict()
test_cfg = dict()

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # full checkpoints (with optimizer) in work_dir; tools/train_digits.py writes the
    # stripped one used by the demo
    checkpoint=dict(type='CheckpointHook', interval=-1, save_last=True, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=True)
