# BRECQ W2A32 on mmpretrain regnetx-600mf (ImageNet-1k) with the paper's recipe
# (configs/_base_/brecq_imagenet.py).
# mmpretrain ships no RegNetX-600MF weights: pass your float checkpoint (e.g. converted
# from pycls) with --checkpoint. The architecture is pycls' RegNetX-600MF.
_base_ = ['../_base_/regnetx-600mf.py', '../_base_/brecq_imagenet.py']
float_checkpoint = None  # --checkpoint PATH
quant_cfg = dict(w_bits=2, a_bits=None)  # activations stay float
