"""mmbrecq's registries hang under mmengine's, so OpenMMLab configs reach our classes."""
import subprocess
import sys
import textwrap

import mmengine.registry as mmengine_registry
import pytest
from mmengine.config import Config

import mmbrecq
from mmbrecq import registry
from mmbrecq.quantizers import AdaRoundQuantizer, LSQQuantizer, UniformQuantizer
from mmbrecq.reconstruction import BlockReconstructor


@pytest.mark.parametrize('name', ['MODELS', 'LOOPS', 'HOOKS', 'DATASETS', 'TRANSFORMS', 'METRICS'])
def test_children_of_mmengine_roots(name):
    ours, root = getattr(registry, name), getattr(mmengine_registry, name)
    assert ours.parent is root
    assert ours.scope == 'mmbrecq'
    assert root.children['mmbrecq'] is ours


@pytest.mark.parametrize('name', ['QUANTIZERS', 'BLOCK_RULES', 'RECONSTRUCTORS', 'TASK_LOSSES',
                                  'SEARCHERS', 'COST_MODELS'])
def test_quantization_registries_are_mmbrecq_roots(name):
    reg = getattr(registry, name)
    assert reg.parent is None and reg.scope == 'mmbrecq'


def test_quantizers_registered():
    q = registry.QUANTIZERS
    for cls in (UniformQuantizer, LSQQuantizer, AdaRoundQuantizer):
        assert cls.__name__ in q
        assert q.get(cls.__name__) is cls
        assert q.get(f'mmbrecq.{cls.__name__}') is cls


def test_block_rules_registered():
    rules = registry.BLOCK_RULES
    expected = {
        'MMPretrainBasicBlockRule': 'mmpretrain.models.backbones.resnet.BasicBlock',
        'MMPretrainBottleneckRule': 'mmpretrain.models.backbones.resnet.Bottleneck',
        'InvertedResidualRule': 'mmpretrain.models.backbones.mobilenet_v2.InvertedResidual',
        'MMDetBasicBlockRule': 'mmdet.models.backbones.resnet.BasicBlock',
        'MMDetBottleneckRule': 'mmdet.models.backbones.resnet.Bottleneck',
    }
    for name, block in expected.items():
        assert name in rules, name
        assert block in rules.get(name).block_types


def test_block_rules_resolve_upstream_classes():
    """The lazily resolved import paths exist in the pinned mmpretrain / mmdet."""
    from mmdet.models.backbones.resnet import Bottleneck as DetBottleneck
    from mmpretrain.models.backbones.resnet import BasicBlock as ClsBasicBlock
    cls_rule = registry.BLOCK_RULES.get('MMPretrainBasicBlockRule')()
    det_rule = registry.BLOCK_RULES.get('MMDetBottleneckRule')()
    assert cls_rule.resolved_types() == (ClsBasicBlock, )
    assert det_rule.resolved_types() == (DetBottleneck, )
    assert det_rule.matches(DetBottleneck(64, 16)) and not cls_rule.matches(DetBottleneck(64, 16))
    for name in ('MMPretrainBottleneckRule', 'InvertedResidualRule', 'MMDetBasicBlockRule'):
        assert len(registry.BLOCK_RULES.get(name)().resolved_types()) == 1, name


def _write_quant_config(tmp_path):
    path = tmp_path / 'quant.py'
    path.write_text("custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)\n"
                    "quantizer = dict(type='mmbrecq.AdaRoundQuantizer', bits=4, num_channels=8,\n"
                    "                 weight_shape=(8, 4))\n")
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports.imports == ['mmbrecq']
    return cfg


def _check_adaround(q):
    assert type(q) is AdaRoundQuantizer
    assert q.bits == 4 and (q.qmin, q.qmax) == (0, 15)
    assert q.scale.shape == (8, ) and q.alpha.shape == (8, 4)
    assert q.rounding == 'nearest'


def test_config_cross_scope_build_through_mmengine_root(tmp_path):
    """``type='mmbrecq.X'`` from any OpenMMLab config, built by mmengine's root MODELS."""
    cfg = _write_quant_config(tmp_path)
    _check_adaround(mmengine_registry.MODELS.build(cfg.quantizer))


def test_config_build_through_quantizers_registry(tmp_path):
    cfg = _write_quant_config(tmp_path)
    _check_adaround(registry.QUANTIZERS.build(cfg.quantizer))


def test_custom_imports_alone_loads_the_plugin(tmp_path):
    """In a fresh interpreter that never imports mmbrecq itself, ``custom_imports`` in the
    config is enough: registries attached, quantizers registered, compat shims applied."""
    cfg_path = tmp_path / 'quant.py'
    _write_quant_config(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        assert 'mmbrecq' not in sys.modules
        from mmengine.config import Config
        import mmengine.registry as R
        from mmengine.runner.checkpoint import CheckpointLoader
        cfg = Config.fromfile({str(cfg_path)!r})
        assert 'mmbrecq' in sys.modules
        assert 'mmbrecq' in R.MODELS.children
        from mmbrecq.registry import QUANTIZERS
        q = QUANTIZERS.build(cfg.quantizer)
        assert type(q).__name__ == 'AdaRoundQuantizer', type(q)
        assert CheckpointLoader._schemes[''].__module__ == 'mmbrecq.utils.compat'
        print('OK')
    """)
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith('OK'), res.stderr[-2000:]


def test_cross_scope_build_unknown_type_fails():
    with pytest.raises(KeyError):
        mmengine_registry.MODELS.build(dict(type='mmbrecq.NoSuchQuantizer', bits=4))


def test_build_from_quantizers_registry():
    q = registry.QUANTIZERS.build(dict(type='LSQQuantizer', bits=8))
    assert type(q) is LSQQuantizer and q.num_channels is None and q.scale.requires_grad
    q = registry.QUANTIZERS.build(dict(type='UniformQuantizer', bits=4, num_channels=3))
    assert type(q) is UniformQuantizer and q.scale.shape == (3, )


def test_reconstructors_build_block_reconstructor():
    rec = registry.RECONSTRUCTORS.build(dict(type='BlockReconstructor'))
    assert type(rec) is BlockReconstructor
    assert isinstance(rec.cfg, dict)
    rec = registry.RECONSTRUCTORS.build(dict(type='mmbrecq.BlockReconstructor'))
    assert type(rec) is BlockReconstructor


def test_package_exports():
    for name in mmbrecq.__all__:
        assert hasattr(mmbrecq, name), name
