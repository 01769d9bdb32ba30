"""trace_layer_stats: weights and per-sample MACs of every Conv2d / Linear, from a forward."""
import mmpretrain.models  # noqa: F401  (registers the backbones: imported once, at collection)
import pytest
import torch
from mmengine.hub import get_config
from mmpretrain.registry import MODELS
from torch import nn

from mmbrecq.mixed_precision import LayerStat, trace_layer_stats
from mmbrecq.modules import QuantConv2d, QuantLinear

torch.set_num_threads(1)  # 2-core CI: multithreaded CPU convs are much slower here


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),           # 16x16 -> 8x8
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


# hand-computed: out elements per sample * in_channels/groups * kh * kw; out * in for fc
TINY = [LayerStat('0', 8 * 3 * 9, 8 * 8 * 8 * 3 * 9),
        LayerStat('3', 8 * 2 * 9, 8 * 8 * 8 * 2 * 9),
        LayerStat('5', 10 * 512, 10 * 512)]


def test_tiny_sequential_hand_computed():
    stats = trace_layer_stats(_tiny(), None, torch.randn(2, 3, 16, 16))
    assert stats == TINY  # per sample: the batch of 2 is divided out


def test_quant_layers_count_like_float():
    model = _tiny()
    model[0] = QuantConv2d.from_float(model[0], nn.Identity(), None)
    model[5] = QuantLinear.from_float(model[5], nn.Identity(), nn.Identity())
    assert trace_layer_stats(model, lambda m, x: m(x), torch.randn(1, 3, 16, 16)) == TINY


def test_linear_on_tokens_and_dict_batch():
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    batch = {'inputs': torch.randn(2, 5, 4), 'data_samples': None}
    stats = trace_layer_stats(model, lambda m, b: m(b['inputs']), batch)
    assert stats == [LayerStat('0', 24, 6 * 4 * 5), LayerStat('2', 18, 3 * 6 * 5)]


def test_shared_and_unreached_layers():
    class Net(nn.Module):

        def __init__(self):
            super().__init__()
            self.shared, self.unused = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.shared(self.shared(x))

    with pytest.warns(UserWarning, match='unused'):
        stats = trace_layer_stats(Net(), lambda m, b: m(b[0]), [torch.randn(3, 4)],
                                  num_samples=3)
    assert stats == [LayerStat('shared', 16, 2 * 16), LayerStat('unused', 8, 0)]


def test_eval_during_trace_and_modes_restored():
    model = _tiny().train()
    model[1].eval()
    before = model[1].running_mean.clone()
    trace_layer_stats(model, None, torch.randn(1, 3, 16, 16))  # batch of 1: BN must be eval
    assert [m.training for m in model] == [True, False, True, True, True, True]
    assert torch.equal(model[1].running_mean, before)
    assert not any(p.grad is not None for p in model.parameters())


@pytest.fixture(scope='module')
def resnet18():
    return MODELS.build(get_config('mmpretrain::resnet/resnet18_8xb32_in1k.py').model)


def test_resnet18_macs_at_224(resnet18):
    stats = trace_layer_stats(resnet18, lambda m, x: m(x, mode='tensor'),
                              torch.randn(1, 3, 224, 224))
    by_name = {s.name: s for s in stats}
    assert len(stats) == 21  # stem + 16 block convs + 3 downsamples + fc
    assert by_name['backbone.conv1'] == LayerStat('backbone.conv1', 64 * 3 * 49,
                                                  112 * 112 * 64 * 3 * 49)
    assert by_name['head.fc'] == LayerStat('head.fc', 512 * 1000, 512 * 1000)
    conv3x3 = 56 * 56 * 64 * 64 * 9  # the same for every 3x3 conv except the strided ones
    stage = conv3x3 // 2 + 3 * conv3x3 + 56 * 56 * 64 * 64 // 2  # strided + 3 convs + 1x1
    total = 112 * 112 * 64 * 3 * 49 + 4 * conv3x3 + 3 * stage + 512 * 1000
    assert sum(s.macs for s in stats) == total == 1_814_073_344  # the known ~1.82 GMACs
    # torchvision's 11,689,512 parameters minus BN (2 x 4800) and the fc bias (1000)
    assert sum(s.params for s in stats) == 11_678_912


def test_batch_size_needed():
    with pytest.raises(ValueError, match='num_samples'):
        trace_layer_stats(_tiny(), lambda m, b: m(b.x), object())
    images = [torch.randn(3, 16, 16) for _ in range(2)]  # un-collated mmengine inputs
    stats = trace_layer_stats(_tiny(), lambda m, b: m(torch.stack(b['inputs'])),
                              {'inputs': images})
    assert stats == TINY
