# BRECQ W4A8 on the detection demo's RetinaNet (slim ResNet-18 FPN, digits on canvases;
# CocoMetric). CPU: python tools/ptq.py configs/brecq/digits_det_retinanet_w4a8.py
_base_ = ['../_base_/digits_retinanet_float.py', '../_base_/brecq_digits_det.py']
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
float_checkpoint = 'checkpoints/digits_retinanet_float.pth'
quant_cfg = dict(w_bits=4, a_bits=8, keep_8bit=['first', 'bbox_head.retina_cls', 'bbox_head.retina_reg'])
