"""Models and inputs shared by the tests (no download: configs come from the installed wheels)."""
import torch
from mmengine.hub import get_config
from torch.nn.modules.batchnorm import _BatchNorm


def images(n, seed, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def build_classifier(cfg_name='resnet/resnet18_8xb32_in1k.py', seed=0):
    """mmpretrain classifier from the installed config with random BN statistics and affine
    parameters (so BN folding is not trivial), in eval mode."""
    from mmpretrain.registry import MODELS
    torch.manual_seed(seed)
    model = MODELS.build(get_config(f'mmpretrain::{cfg_name}').model)
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()
