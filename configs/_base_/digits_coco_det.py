# What the two float detectors of the detection demo share (configs/_base_/digits_{retinanet,
# faster_rcnn}_float.py): mmbrecq.DigitsCocoDataset (scikit-learn's digits pasted 1..5 per
# 128x128 canvas at 12..40 px; 1500 train / 250 test canvases, generated under
# data/digits_coco on first use, no download), CocoMetric, the optimiser and the runtime.
# Each model config adds the model and its epoch schedule (max_epochs, param_scheduler,
# train_cfg).
custom_imports = dict(imports=['mmbrecq.datasets'], allow_failed_imports=False)
default_scope = 'mmdet'
canvas_size = 128

# ---------------------------------------------------------------- model (each config adds its type and heads)
# base channels 16 instead of 64 (stages 16/32/64/128), FPN P2..P5 (strides 4..32) with
# 32 channels: the digits' boxes are ~10..36 px (sqrt(w*h)), so P2/P3 carry nearly all
# positives. No pretrained weights: everything is trained on the digits canvases, so BN
# is trained too (norm_eval=False, no frozen stages).
model = dict(
    # inside `model` so that MODELS.build(cfg.model) alone (as the PTQ tools do) gets the
    # normalisation too
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        # grey canvases repeated to 3 channels: mean/std of the train canvases (0..255)
        mean=[14.41, 14.41, 14.41],
        std=[33.03, 33.03, 33.03],
        bgr_to_rgb=False,
        pad_size_divisor=32),
    backbone=dict(
        type='ResNet',
        depth=18,
        base_channels=16,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None),
    neck=dict(
        type='FPN',
        in_channels=[16, 32, 64, 128],
        out_channels=32,
        start_level=0,
        num_outs=4))

# ---------------------------------------------------------------- data
dataset_type = 'mmbrecq.DigitsCocoDataset'
data_root = 'data/digits_coco/'
# The canvases all have one size, so batches have equal shapes (as PTQ calibration needs)
# and no padding. The Resize to that same size changes no pixel: it is there because the
# heads' predict(rescale=True) needs `scale_factor` (1.0 here) in the metainfo.
# No flips: digits are not flip-invariant; the composer already randomises positions,
# sizes and contrast.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(canvas_size, canvas_size), keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(canvas_size, canvas_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='train',
        filter_cfg=dict(filter_empty_gt=True, min_size=1),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split='test',
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
# CocoMetric reads ann_file when it is built; the loops build their dataloader (and so
# the dataset, which generates the files when missing) before their evaluator.
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/test.json',
    metric='bbox',
    format_only=False)
test_evaluator = val_evaluator

# ---------------------------------------------------------------- optimiser and loops
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # full checkpoints (with optimizer) in work_dir; tools/train_digits_det.py writes the
    # stripped one used by the demo
    checkpoint=dict(type='CheckpointHook', interval=-1, save_last=True, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook', draw=False),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=True)
