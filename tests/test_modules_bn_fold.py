"""fold_bn / fold_conv_bn: eval-mode BatchNorm folded into the conv that feeds it."""
import pytest
import torch
from mmcv.cnn import ConvModule
from mmengine.hub import get_config
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmbrecq.modules import fold_bn, fold_conv_bn

torch.set_num_threads(1)  # 2-core CI: multithreaded CPU convs are much slower here


def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@torch.no_grad()
def _randomise_bn(model, seed=0):
    """Non-trivial running stats and affine params, so that folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def _build(cfg_name):
    from mmpretrain.registry import MODELS
    model = MODELS.build(get_config(f'mmpretrain::{cfg_name}').model)
    return _randomise_bn(model).eval()


def _num_bn(model):
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.fixture(scope='module', params=[
    ('resnet/resnet18_8xb32_in1k.py', 20),
    ('mobilenet_v2/mobilenet-v2_8xb32_in1k.py', 52),
], ids=['resnet18', 'mobilenet_v2'])
def folded(request):
    cfg_name, expected_pairs = request.param
    model = _build(cfg_name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, mode='tensor')
    n_bn = _num_bn(model)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d)}
    pairs = fold_bn(model)
    return dict(model=model, x=x, ref=ref, pairs=pairs, n_bn=n_bn, weights=weights,
                expected_pairs=expected_pairs, cfg_name=cfg_name)


def test_folded_model_output_matches_float(folded):
    with torch.no_grad():
        out = folded['model'](folded['x'], mode='tensor')
    assert out.shape == folded['ref'].shape
    assert _rel_err(out, folded['ref']) < 1e-5


def test_every_bn_folded_and_replaced_by_identity(folded):
    model, pairs = folded['model'], folded['pairs']
    assert folded['n_bn'] == folded['expected_pairs']
    assert len(pairs) == folded['expected_pairs']
    assert len(set(pairs)) == len(pairs)
    assert _num_bn(model) == 0
    for conv_name, bn_name in pairs:
        assert type(model.get_submodule(bn_name)) is nn.Identity, bn_name
        conv = model.get_submodule(conv_name)
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None, conv_name
        # the weights really changed (random BN scale != 1)
        assert not torch.allclose(conv.weight, folded['weights'][conv_name]), conv_name


def test_fold_pair_names(folded):
    pairs = folded['pairs']
    if folded['cfg_name'].startswith('resnet'):
        assert pairs[0] == ('backbone.conv1', 'backbone.bn1')
        assert ('backbone.layer1.0.conv2', 'backbone.layer1.0.bn2') in pairs
        assert ('backbone.layer2.0.downsample.0', 'backbone.layer2.0.downsample.1') in pairs
        assert sum('downsample' in c for c, _ in pairs) == 3
        # attribute access by the block's forward keeps working
        block = folded['model'].backbone.layer1[0]
        assert isinstance(block.norm1, nn.Identity) and isinstance(block.norm2, nn.Identity)
    else:
        assert pairs[0] == ('backbone.conv1.conv', 'backbone.conv1.bn')
        assert ('backbone.layer2.0.conv.1.conv', 'backbone.layer2.0.conv.1.bn') in pairs
        assert pairs[-1] == ('backbone.conv2.conv', 'backbone.conv2.bn')
        assert isinstance(folded['model'].backbone.conv1.norm, nn.Identity)


def test_second_fold_is_a_noop(folded):
    assert fold_bn(folded['model']) == []


def test_training_mode_raises_and_leaves_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    _randomise_bn(model).train()
    w = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match='eval'):
        fold_bn(model)
    assert isinstance(model[1], nn.BatchNorm2d) and torch.equal(model[0].weight, w)
    model.eval()
    assert len(fold_bn(model)) == 1


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('groups', [1, 2])
def test_fold_conv_bn_numerics(bias, affine, groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups),
                          nn.BatchNorm2d(6, affine=affine))
    _randomise_bn(model).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    fold_conv_bn(model[0], model[1])
    assert model[0].bias is not None
    with torch.no_grad():
        out = model[0](x)
    assert _rel_err(out, ref) < 1e-5


def test_sequential_pairs_only_adjacent_conv_then_bn():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: followed by a ReLU, not by the BN -> not folded
        nn.ReLU(),
        nn.BatchNorm2d(8),  # 2
        nn.Conv2d(8, 8, 3, padding=1),  # 3 -> folded with 4
        nn.BatchNorm2d(8),  # 4
    )
    _randomise_bn(model).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    assert fold_bn(model) == [('3', '4')]
    assert isinstance(model[2], nn.BatchNorm2d) and isinstance(model[4], nn.Identity)
    with torch.no_grad():
        assert _rel_err(model(x), ref) < 1e-5


class _MismatchedPair(nn.Module):
    """A conv registered right before a BN of another width (the BN reads something else)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_mismatched_channels_are_not_folded():
    model = _randomise_bn(_MismatchedPair()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    w = model.conv.weight.detach().clone()
    assert fold_bn(model) == []
    assert isinstance(model.bn, nn.BatchNorm2d) and torch.equal(model.conv.weight, w)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_bn_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert fold_bn(model) == []
    assert isinstance(model[1], nn.BatchNorm2d)


def _conv_module(order):
    # in == out channels, so a purely structural (channel-count) check would fold it
    m = ConvModule(4, 4, 3, padding=1, norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU'),
                   order=order)
    return _randomise_bn(m, seed=3).eval()


def test_norm_before_conv_module_is_not_folded():
    m = _conv_module(('norm', 'conv', 'act'))
    assert [n for n, _ in m.named_children()][:2] == ['conv', 'bn']  # registration order
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = m(x)
    assert fold_bn(m) == []
    assert isinstance(m.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    # same when the ConvModule is nested in a model
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _conv_module(('norm', 'conv', 'act'))).eval()
    assert fold_bn(model) == []


def test_conv_before_norm_module_is_folded():
    m = _conv_module(('conv', 'norm', 'act'))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = m(x)
    assert fold_bn(m) == [('conv', 'bn')]
    assert isinstance(m.bn, nn.Identity)
    with torch.no_grad():
        assert _rel_err(m(x), ref) < 1e-5


def test_conv_act_norm_module_is_not_folded():
    m = _conv_module(('conv', 'act', 'norm'))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = m(x)
    pairs = fold_bn(m)
    with torch.no_grad():
        out = m(x)
    assert _rel_err(out, ref) < 1e-5
    assert pairs == []
