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


#: min-max ranges: the Lp search (the default) is too slow for unit tests on 2 CPU cores
FAST_QCFG = dict(w_bits=4, a_bits=4, weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
                 act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def reconstructed_like_resnet18(seed=0, qcfg=FAST_QCFG):
    """A quantized ResNet-18 as reconstruction leaves it: activations calibrated, every other
    layer in hard rounding with (random) learned alpha, the rest in nearest rounding."""
    import mmbrecq
    from mmbrecq.modules import QuantLayerMixin
    model = mmbrecq.quantize_model(build_classifier('resnet/resnet18_8xb32_in1k.py', seed), qcfg)
    mmbrecq.calibrate_activations(model, [images(8, seed=7)], lambda m, b: m(b, mode='tensor'))
    g = torch.Generator().manual_seed(11)
    layers = [m for m in model.modules() if isinstance(m, QuantLayerMixin)]
    for layer in layers[1::2]:
        q = layer.weight_quantizer
        q.set_rounding('soft', layer.weight)
        with torch.no_grad():
            q.alpha.copy_(torch.randn(layer.weight.shape, generator=g) * 3)
        q.set_rounding('hard')
    return model
