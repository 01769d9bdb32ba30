# BRECQ W4A8 on the detection demo's Faster R-CNN (slim ResNet-18 FPN, digits on canvases;
# CocoMetric). CPU: python tools/ptq.py configs/brecq/digits_det_faster-rcnn_w4a8.py
_base_ = ['../_base_/digits_faster_rcnn_float.py', '../_base_/brecq_digits_det.py']
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = 'checkpoints/digits_faster_rcnn_float.pth'
quant_cfg = dict(w_bits=4, a_bits=8, keep_8bit=['first', 'rpn_head.rpn_cls', 'rpn_head.rpn_reg', 'roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg'])
