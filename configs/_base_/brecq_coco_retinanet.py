# The COCO detection recipe (brecq_coco.py) for RetinaNet: the first conv and the class /
# box output convs stay 8-bit.
_base_ = './brecq_coco.py'
quant_cfg = dict(keep_8bit=['first', 'bbox_head.retina_cls', 'bbox_head.retina_reg'])
