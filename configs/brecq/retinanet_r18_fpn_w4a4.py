# BRECQ W4A4 on mmdet RetinaNet R-18-FPN (COCO) with the detection recipe
# (configs/_base_/brecq_coco_retinanet.py).
_base_ = ['mmdet::retinanet/retinanet_r18_fpn_1x_coco.py', '../_base_/brecq_coco_retinanet.py']
float_checkpoint = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r18_fpn_1x_coco/retinanet_r18_fpn_1x_coco_20220407_171055-614fd399.pth'
quant_cfg = dict(w_bits=4, a_bits=4)
