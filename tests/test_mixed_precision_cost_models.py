"""Cost models (size, BOPs, latency table) against hand-computed values."""
import csv
import json

import mmpretrain.models  # noqa: F401  (registers the backbones: imported once, at collection)
import pytest
import torch
from mmengine.hub import get_config
from mmpretrain.registry import MODELS
from torch import nn

from mmbrecq.mixed_precision import (
    BOPs,
    LatencyTable,
    LayerStat,
    ModelSize,
    trace_layer_stats,
)
from mmbrecq.registry import COST_MODELS, build_from

torch.set_num_threads(1)  # 2-core CI: multithreaded CPU convs are much slower here

MiB = 2 ** 20


@pytest.fixture(scope='module')
def tiny_stats():
    """conv 3->4 3x3 on 6x6 (padding 1) then linear 144->5; hand-computed below."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 5))
    stats = trace_layer_stats(model, None, torch.randn(1, 3, 6, 6))
    assert stats == [LayerStat('0', 108, 36 * 4 * 27), LayerStat('2', 720, 720)]
    return stats


def test_model_size(tiny_stats):
    size = ModelSize(tiny_stats)
    assert size({}) == pytest.approx((108 + 720) * 4 / MiB)  # all float: 4 bytes a weight
    assert size.cost({'0': (4, 8), '2': (8, None)}) == pytest.approx((108 / 2 + 720) / MiB)
    assert size({'0': (2, None)}) == pytest.approx((108 / 4 + 720 * 4) / MiB)  # '2' stays 32


def test_bops(tiny_stats):
    bops = BOPs(tiny_stats)
    assert bops({}) == 3888 * 32 * 32 + 720 * 32 * 32
    assert bops({'0': (4, 8), '2': (8, None)}) == 3888 * 4 * 8 + 720 * 8 * 32
    assert bops({'0': (2, 4), '2': (8, 8)}) == 3888 * 2 * 4 + 720 * 8 * 8


def test_unknown_layer_is_an_error(tiny_stats):
    with pytest.raises(KeyError, match='conv1'):
        BOPs(tiny_stats)({'conv1': (4, 4)})


def test_registered_and_built_from_dicts(tiny_stats):
    as_dicts = [dict(name=s.name, params=s.params, macs=s.macs) for s in tiny_stats]
    for name, cls in [('ModelSize', ModelSize), ('BOPs', BOPs)]:
        assert COST_MODELS.get(f'mmbrecq.{name}') is cls
        model = build_from(COST_MODELS, dict(type=name), layer_stats=as_dicts)
        assert model({'0': (4, 4)}) == cls(tiny_stats)({'0': (4, 4)})


ROWS = [('0', 4, 8, 0.25), ('0', 8, 8, 0.5), ('0', 32, 32, 2.0),
        ('2', 8, 8, 0.125), ('2', 32, 32, 1.0)]


def _write_json(path):
    path.write_text(json.dumps([dict(layer=n, w_bits=w, a_bits=a, latency_ms=t)
                                for n, w, a, t in ROWS]))
    return path


def _write_csv(path):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['layer', 'w_bits', 'a_bits', 'latency_ms'])
        writer.writerows(ROWS)
    return path


@pytest.mark.parametrize('write', [_write_json, _write_csv])
def test_latency_table(tmp_path, tiny_stats, write):
    path = write(tmp_path / f'lat.{write.__name__[7:]}')
    table = build_from(COST_MODELS, dict(type='LatencyTable', table=str(path)),
                       layer_stats=tiny_stats)
    assert table({'0': (4, 8), '2': (8, 8)}) == 0.25 + 0.125
    assert table({'0': (8, 8)}) == 0.5 + 1.0  # '2' absent: float (32, 32)
    assert table({}) == 3.0
    with pytest.raises(KeyError, match=r"'2' at w_bits=4, a_bits=8"):
        table({'0': (4, 8), '2': (4, 8)})
    with pytest.raises(KeyError, match=r"'0' at w_bits=2, a_bits=32"):
        table({'0': (2, None)})


def test_latency_table_bad_files(tmp_path, tiny_stats):
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'rows': [dict(layer='0', w_bits=4, latency_ms=1.0)]}))
    with pytest.raises(ValueError, match='row 0'):
        LatencyTable(tiny_stats, str(bad))
    with pytest.raises(ValueError, match='.json or .csv'):
        LatencyTable(tiny_stats, str(tmp_path / 'lat.txt'))


@pytest.fixture(scope='module')
def resnet18_stats():
    model = MODELS.build(get_config('mmpretrain::resnet/resnet18_8xb32_in1k.py').model)
    return trace_layer_stats(model, lambda m, x: m(x, mode='tensor'), torch.randn(1, 3, 224, 224))


def test_resnet18_costs(resnet18_stats):
    macs, params = 1_814_073_344, 11_678_912
    first, last = resnet18_stats[0], resnet18_stats[-1]
    assert (first.name, last.name) == ('backbone.conv1', 'head.fc')
    assert ModelSize(resnet18_stats)({}) == pytest.approx(44.55, abs=0.01)  # the FP32 size
    # W4A4 with the first and last layer (and the last layer's input) at 8 bits
    w4a4 = {s.name: (4, 4) for s in resnet18_stats}
    w4a4.update({first.name: (8, None), last.name: (8, 8)})
    middle_macs = macs - first.macs - last.macs
    assert BOPs(resnet18_stats)(w4a4) == (middle_macs * 16 + first.macs * 8 * 32 +
                                          last.macs * 64)
    middle_params = params - first.params - last.params
    assert ModelSize(resnet18_stats)(w4a4) == pytest.approx(
        (middle_params / 2 + first.params + last.params) / MiB)
