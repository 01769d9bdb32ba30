# BRECQ recipe for mmdet detectors (COCO), shared by configs/brecq/{faster-rcnn,retinanet}_*:
# 64 calibration images from the training set through the detector's own train pipeline
# (padded to one size), 20k iterations per unit, batch 2 images, lambda 0.01, beta 20->2
# after a 20% warm-up, Fisher-weighted output loss with the detection divergence of the
# raw head outputs (mmbrecq.DetectionDivergence, chosen automatically for detectors).
# Two-stage detectors calibrate their RoI head on the float model's 256 best proposals
# per image. The first conv and the final class/box layers stay 8-bit (set per family).
#
# Memory: with 1333x800 COCO images padded to 1344x1344, one cached ResNet-50 stage-1
# tensor is ~115 MB per image; input + target + Fisher weights of the largest unit take
# ~22 GB for 64 images (host memory, else a disk memmap in the work dir, automatically).
custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)
# Everything not set here is quant_cfg's default (mmbrecq/config/quant_cfg.py).
quant_cfg = dict(
    w_bits=4,
    a_bits=8,
    calib=dict(num_samples=64, batch_size=2),
    recon=dict(batch_size=2),
)
