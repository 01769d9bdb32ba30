# Mixed-precision BRECQ on mmpretrain resnet18 (ImageNet-1k), paper's recipe
# (configs/_base_/brecq_imagenet.py): per-layer weight bits from {2, 4, 8} searched under
# the weight size of uniform 4-bit (first/last layer 8-bit), activations 4-bit.
_base_ = ['mmpretrain::resnet/resnet18_8xb32_in1k.py', '../_base_/brecq_imagenet.py']
float_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet18_8xb32_in1k_20210831-fbbb1da6.pth'
quant_cfg = dict(
    w_bits=4,
    a_bits=4,
    mixed_precision=dict(
        type='GeneticSearcher',
        budget=dict(size_mb='uniform_w4'),
        candidates=(2, 4, 8),
        sensitivity=dict(iters=0, fisher_weight='raw'),
        seed=0,
    ),
)
