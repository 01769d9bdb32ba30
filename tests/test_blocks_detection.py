"""Detector block rules: the dense-head tower (one unit per ``cls_convs`` / ``reg_convs``)
keeps the model's parameter names and behaviour, and can be switched off by config."""
import copy

import torch
from torch import nn

import mmbrecq
from mmbrecq.blocks.detection import DenseHeadTowerRule, HeadTower
from mmbrecq.reconstruction import find_units

from _models import FAST_QCFG, build_detector, detection_batches

torch.set_num_threads(1)


def test_tower_is_one_call_with_the_same_names_and_outputs():
    convs = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)]
    plain = nn.ModuleList(copy.deepcopy(convs))
    tower = HeadTower(list(convs))
    tower.load_state_dict(plain.state_dict())
    assert list(tower.state_dict()) == list(plain.state_dict())
    assert len(tower) == 3 and tower[1] is convs[1] and tower[-1] is convs[2]
    x = torch.randn(2, 4, 8, 8)
    y = x
    for conv in plain:  # what a head does
        y = conv(y)
    calls = []
    tower.register_forward_hook(lambda m, i, o: calls.append(1))
    z = x
    for conv in tower:  # the same head loop: a single call of the whole tower
        z = conv(z)
    assert torch.equal(y, z) and calls == [1]
    tower.add_module('input_quantizer', nn.Identity())  # what the swap adds to a block
    assert len(tower) == 3 and tower.layers() == convs


def test_rule_matches_dense_head_towers_only():
    retina = build_detector('retinanet')
    faster = build_detector('faster_rcnn')
    rule = DenseHeadTowerRule()
    head = retina.bbox_head
    assert rule.match(head, 'cls_convs', head.cls_convs) and rule.match(head, 'reg_convs', head.reg_convs)
    assert not rule.match(head, 'retina_cls', head.retina_cls)
    assert not rule.match(retina.neck, 'fpn_convs', retina.neck.fpn_convs)  # not a head
    assert not any(rule.match(m, n, c) for m in faster.modules() for n, c in m.named_children())


def test_quantized_retinanet_towers_keep_stock_parameter_names():
    model = build_detector('retinanet')
    float_keys = set(model.state_dict())
    batches = detection_batches(model, n_batches=1)
    mmbrecq.quantize_model(model, FAST_QCFG)
    assert isinstance(model.bbox_head.cls_convs, HeadTower)
    units = {u.name: u.kind for u in find_units(model)}
    assert units['bbox_head.cls_convs'] == units['bbox_head.reg_convs'] == 'HeadTower'
    assert 'bbox_head.cls_convs.0.conv' not in units
    stem = next(u for u in find_units(model) if u.name == 'backbone.conv1')  # mmdet's ResNet stem
    assert [type(m).__name__ for m in stem.tail] == ['Identity', 'ReLU', 'MaxPool2d']
    tower_keys = {k for k in float_keys if k.startswith(('bbox_head.cls_convs.', 'bbox_head.reg_convs.'))}
    assert tower_keys and tower_keys <= set(model.state_dict())  # e.g. bbox_head.cls_convs.0.conv.weight
    mmbrecq.calibrate_activations(model, batches, lambda m, b: m(b['inputs'], mode='tensor'))
    with torch.no_grad():
        cls, _ = model(batches[0]['inputs'], mode='tensor')
    assert len(cls) == 5 and all(torch.isfinite(c).all() for c in cls)


def test_towers_can_be_reconstructed_layer_by_layer_instead():
    model = build_detector('retinanet')
    rules = ['MMDetBasicBlockRule', 'MMDetBottleneckRule']
    mmbrecq.quantize_model(model, dict(FAST_QCFG, block_rules=rules))
    units = {u.name for u in find_units(model)}
    assert type(model.bbox_head.cls_convs) is nn.ModuleList
    assert {'bbox_head.cls_convs.0.conv', 'bbox_head.cls_convs.1.conv'} <= units
