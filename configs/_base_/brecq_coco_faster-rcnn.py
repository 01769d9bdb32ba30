# The COCO detection recipe (brecq_coco.py) for Faster R-CNN: the first conv and the RPN /
# box-head output layers stay 8-bit.
_base_ = './brecq_coco.py'
quant_cfg = dict(keep_8bit=['first', 'rpn_head.rpn_cls', 'rpn_head.rpn_reg', 'roi_head.bbox_head.fc_cls',
                            'roi_head.bbox_head.fc_reg'])
