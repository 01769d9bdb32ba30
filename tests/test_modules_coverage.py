"""No silent fallback (mmbrecq/modules/coverage.py): a block class without a rule is named once."""
import logging

import pytest
import torch
from torch import nn

import mmbrecq
import mmbrecq.modules.coverage as coverage
from mmbrecq.blocks import BlockRule
from mmbrecq.reconstruction import find_units
from mmbrecq.registry import BLOCK_RULES

from _models import FAST_QCFG, build_classifier

torch.set_num_threads(1)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MyBlock(nn.Module):
    """A residual block no rule knows, with an SE branch of its own."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2, self.se = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), \
            SqueezeExcite(c)

    def forward(self, x):
        return x + self.se(self.conv2(torch.relu(self.conv1(x))))


class Head(nn.Module):
    """One module with two layers: a head, not a block (occurs once)."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c), nn.Linear(c, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(MyBlock(8), MyBlock(8), MyBlock(8)),
                         Head(8)).eval()


@pytest.fixture
def logged(monkeypatch):
    out = []
    monkeypatch.setattr(coverage, 'print_log', lambda msg, **kw: out.append((msg, kw.get('level'))))
    return out


def test_unknown_block_warned_once_per_class(logged):
    model = mmbrecq.quantize_model(_model(), FAST_QCFG)
    path = f'{__name__}.MyBlock'
    assert len(logged) == 1
    msg, level = logged[0]
    assert level == logging.WARNING
    assert path in msg and '1.0, 1.1, 1.2' in msg and 'its 12 quantized layers' in msg
    assert 'BLOCK_RULES' in msg and 'README' in msg
    assert 'SqueezeExcite' not in msg and 'Head' not in msg  # part of the block / not repeated
    assert {u.kind for u in find_units(model)} == {'Conv2d', 'Linear'}  # the fallback it warns about
    assert coverage.uncovered_blocks(model) == {path: ['1.0', '1.1', '1.2']}


class Stage(nn.Module):
    """A custom stage class (not a Sequential) of blocks, like DenseNet's DenseBlock."""

    def __init__(self, c, n):
        super().__init__()
        self.blocks = nn.ModuleList(MyBlock(c) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_a_custom_stage_class_is_not_the_block(logged):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Stage(8, 2), Stage(8, 2), Head(8)).eval()
    mmbrecq.quantize_model(model, FAST_QCFG)
    assert len(logged) == 1 and f'{__name__}.MyBlock' in logged[0][0] and '(4 in all)' in logged[0][0]
    assert 'Stage' not in logged[0][0]


def test_a_registered_rule_silences_it(logged):
    name = 'TestMyBlockRule'

    class TestMyBlockRule(BlockRule):
        block_types = (f'{__name__}.MyBlock', )
        kind = 'MyBlock'

    BLOCK_RULES.register_module(name=name, module=TestMyBlockRule)
    try:
        model = mmbrecq.quantize_model(_model(), FAST_QCFG)
    finally:
        BLOCK_RULES.module_dict.pop(name)
    assert logged == []
    assert [u.kind for u in find_units(model)].count('MyBlock') == 3


def test_unused_rules_warn_for_known_blocks(logged):
    """quant_cfg.block_rules without the BasicBlock rule: ResNet-18's blocks fall back, and say so."""
    mmbrecq.quantize_model(build_classifier(), dict(FAST_QCFG, block_rules=['MMPretrainResNetStemRule']))
    assert len(logged) == 1 and 'mmpretrain.models.backbones.resnet.BasicBlock' in logged[0][0]
    assert '(8 in all)' in logged[0][0]


@pytest.mark.parametrize('cfg_name', ['resnet/resnet18_8xb32_in1k.py', 'mobilenet_v2/mobilenet-v2_8xb32_in1k.py',
                                      'mobilenet_v3/mobilenet-v3-small_8xb128_in1k.py'])
def test_covered_models_are_silent(logged, cfg_name):
    mmbrecq.quantize_model(build_classifier(cfg_name), FAST_QCFG)
    assert logged == []
