# BRECQ W4A8 on mmdet Faster R-CNN R-50-FPN (COCO) with the detection recipe
# (configs/_base_/brecq_coco_faster-rcnn.py).
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/brecq_coco_faster-rcnn.py']
float_checkpoint = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth'
quant_cfg = dict(w_bits=4, a_bits=8)
