# mmdet Faster R-CNN R-18-FPN (mmdet ships the R-50 config): ResNet-18 backbone, FPN on
# its 64..512 channels.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))
