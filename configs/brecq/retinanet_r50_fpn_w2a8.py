# BRECQ W2A8 on mmdet RetinaNet R-50-FPN (COCO) with the detection recipe
# (configs/_base_/brecq_coco_retinanet.py).
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', '../_base_/brecq_coco_retinanet.py']
float_checkpoint = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth'
quant_cfg = dict(w_bits=2, a_bits=8)
