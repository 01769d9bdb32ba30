# BRECQ W4A8 on mmdet Faster R-CNN R-18-FPN (COCO) with the detection recipe
# (configs/_base_/brecq_coco.py).
# mmdet publishes no Faster R-CNN R-18-FPN 1x weights: train one with mmdet (this
# architecture) and pass it with --checkpoint.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/brecq_coco.py']
float_checkpoint = None  # --checkpoint PATH
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))
quant_cfg = dict(w_bits=4, a_bits=8, keep_8bit=['first', 'rpn_head.rpn_cls', 'rpn_head.rpn_reg', 'roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg'])
