# BRECQ W4A4 on mmdet Faster R-CNN R-18-FPN (COCO) with the detection recipe
# (configs/_base_/brecq_coco_faster-rcnn.py).
# mmdet publishes no Faster R-CNN R-18-FPN 1x weights: train one with mmdet (this
# architecture) and pass it with --checkpoint.
_base_ = ['../_base_/faster-rcnn_r18_fpn.py', '../_base_/brecq_coco_faster-rcnn.py']
float_checkpoint = None  # --checkpoint PATH
quant_cfg = dict(w_bits=4, a_bits=4)
