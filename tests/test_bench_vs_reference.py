"""The pieces of benchmarks/bench_vs_reference.py that need no reference run: the mapping of our
float model onto the reference's ResNet layout, the CPU shims, the table and its ties.

The reference checkouts are optional: BRECQ_REFERENCE / QDROP_REFERENCE (paths to checkouts
of yhhhli/BRECQ and wimh966/QDrop) turn on the tests against their own model classes;
without them the layout is checked against torchvision's ResNet, which the reference
``models/resnet.py`` files derive from (same constructor, ``_make_layer`` and names).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from _models import randomize_bn

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / 'configs' / '_base_' / 'digits_resnet_float.py'
sys.path.insert(0, str(ROOT / 'benchmarks'))  # the benchmark's own helpers (_seeds), as when it runs as a script


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = _load(ROOT / 'benchmarks' / '_reference_driver.py', '_bench_reference_driver')
bench = _load(ROOT / 'benchmarks' / 'bench_vs_reference.py', '_bench_vs_reference')


def _reference_resnet_modules():
    """``[(name, the reference's models/resnet.py as a module)]`` for the checkouts in the environment."""
    out = []
    for env, rel in (('BRECQ_REFERENCE', 'models/resnet.py'), ('QDROP_REFERENCE', 'qdrop/model/resnet.py')):
        path = os.environ.get(env)
        if path and (Path(path) / rel).is_file():
            out.append((env, _load(Path(path) / rel, f'_reference_resnet_{env.lower()}')))
    return out


def digits_resnet(seed=0):
    """The digits demo's float architecture, random weights and BN statistics (no checkpoint)."""
    from mmpretrain.registry import MODELS
    torch.manual_seed(seed)
    cfg = Config.fromfile(str(DIGITS_CONFIG))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    return randomize_bn(model, seed + 1).eval()


def _shared(model, n=6):
    """What bench_vs_reference saves for the driver, for a few random images."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(x, mode='tensor')
    return dict(arch=bench.resnet_arch(model), float_state_dict=model.state_dict(), test_inputs=[x],
                fp_logits=[logits])


def test_resnet_arch_reads_the_digits_model():
    arch = bench.resnet_arch(digits_resnet())
    assert arch == dict(stem=dict(channels=16, kernel=3, stride=1, padding=1), maxpool=False,
                        stage_blocks=[2, 2, 2, 2], widths=[16, 32, 64, 128], strides=[1, 2, 2, 2], num_classes=10)


def test_resnet_arch_rejects_other_backbones():
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(str(ROOT / 'configs' / '_base_' / 'digits_mobilenet_v3_float.py'))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    with pytest.raises(SystemExit, match='plain ResNet'):
        bench.resnet_arch(model)


def test_names_map_onto_the_reference_layout():
    sd = digits_resnet().state_dict()
    mapped = driver.to_reference_names(sd)
    assert len(mapped) == len(sd)
    assert {'conv1.weight', 'bn1.running_var', 'layer1.0.conv1.weight', 'layer2.0.downsample.0.weight',
            'layer4.1.bn2.bias', 'fc.weight', 'fc.bias'} <= set(mapped)
    assert torch.equal(mapped['layer3.1.conv2.weight'], sd['backbone.layer3.1.conv2.weight'])
    with pytest.raises(ValueError, match='neck.extra'):
        driver.to_reference_names({'neck.extra': torch.zeros(1)})


def test_reference_layout_logits_equal_ours_torchvision_layout():
    import torchvision.models.resnet as tv_resnet
    model = digits_resnet()
    net, diff = driver.load_reference_float(tv_resnet, _shared(model))
    assert diff < driver.FLOAT_TOLERANCE
    assert net.fc.in_features == 128 and isinstance(net.maxpool, torch.nn.Identity)
    # the check fails on a wrong mapping: two blocks' weights swapped
    data = _shared(model)
    sd = data['float_state_dict']
    sd['backbone.layer1.0.conv1.weight'], sd['backbone.layer1.1.conv1.weight'] = (
        sd['backbone.layer1.1.conv1.weight'], sd['backbone.layer1.0.conv1.weight'])
    with pytest.raises(SystemExit, match='differs from ours'):
        driver.load_reference_float(tv_resnet, data)


@pytest.mark.skipif(not _reference_resnet_modules(), reason='no reference checkout (BRECQ_REFERENCE / QDROP_REFERENCE)')
def test_reference_layout_logits_equal_ours_reference_classes():
    model = digits_resnet(seed=5)
    for env, resnet_module in _reference_resnet_modules():
        net, diff = driver.load_reference_float(resnet_module, _shared(model))
        assert diff < driver.FLOAT_TOLERANCE, env
        assert all(type(b) is resnet_module.BasicBlock for b in net.layer2), env  # what its quant rules match


def test_cpu_shims_map_cuda_to_cpu():
    if torch.cuda.is_available():
        pytest.skip('the shims are installed only without CUDA')
    code = ('import sys, torch; sys.path.insert(0, sys.argv[1]); import _reference_driver as d; '
            'd.install_cpu_shims(); t = torch.ones(2);'
            "assert t.to('cuda').device.type == 'cpu' and t.to(device=torch.device('cuda:0')).device.type == 'cpu';"
            "assert t.cuda() is t and t.to(torch.float64).dtype == torch.float64; torch.cuda.empty_cache();"
            "m = torch.nn.Linear(2, 2); assert m.cuda() is m; print('ok')")
    out = subprocess.run([sys.executable, '-c', code, str(ROOT / 'benchmarks')], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr


def test_attrdict_is_nested_attribute_access():
    cfg = driver.AttrDict(dict(quant=dict(a_qconfig=dict(bit=4), recon=dict(b_range=[20, 2])), stages=[dict(x=1)]))
    cfg.quant.a_qconfig.bit = 2
    assert cfg['quant']['a_qconfig']['bit'] == 2 and cfg.stages[0].x == 1 and cfg.quant.recon.b_range == [20, 2]
    assert cfg.get('kwargs', 7) == 7
    with pytest.raises(AttributeError):
        cfg.missing


def test_mean_spread_and_ties():
    assert bench.mean_spread([90.0, 92.0, 91.0]) == (91.0, 1.0)
    assert bench.mean_spread([5.0]) == (5.0, 0.0)
    assert bench.compare((91.0, 1.0), (90.5, 0.2), True) == 'tie'       # 0.5 < larger spread 1.0
    assert bench.compare((91.0, 0.2), (90.5, 0.2), True) == 'better'
    assert bench.compare((0.10, 0.01), (0.05, 0.01), False) == 'worse'  # KL: lower is better
    assert bench.compare((0.04, 0.0), (0.05, 0.0), False) == 'better'
    assert bench.compare((1.0, 0.0), (1.0, 0.0), True) == 'tie'


def _rows(setting, impl, top1s, kls):
    return [dict(setting=setting, impl=impl, seed=s, top1=t, kl=k) for s, (t, k) in enumerate(zip(top1s, kls))]


def test_markdown_table_marks_best_ties_and_compares_with_the_reference():
    rows = (_rows('w2a2', 'ref_brecq', [90.0, 91.0, 92.0], [0.20, 0.22, 0.24])
            + _rows('w2a2', 'brecq', [95.0, 95.5, 96.0], [0.21, 0.23, 0.25])
            + _rows('w2a2', 'brecq_qdrop', [95.6, 95.6, 95.6], [0.40, 0.40, 0.40])
            + _rows('w4a4', 'brecq', [99.0], [0.01]))
    table = bench.markdown_table(rows, ['w2a2', 'w4a4', 'w3a3'], list(bench.IMPLS), float_top1=99.44)
    lines = table.splitlines()
    assert 'Float model: top-1 99.44 %.' in lines
    by_impl = {line.split(' | ')[1]: line for line in lines if line.startswith('| W2A2')}
    assert set(by_impl) == {'reference BRECQ', 'mmbrecq default', "mmbrecq input_mix='qdrop'"}
    # top-1: 95.60 ± 0 is best, 95.50 ± 0.50 ties with it; 91.00 ± 1.00 does not
    assert '**95.60 ± 0.00**' in by_impl["mmbrecq input_mix='qdrop'"]
    assert '**95.50 ± 0.50**' in by_impl['mmbrecq default']
    assert '| 91.00 ± 1.00 |' in by_impl['reference BRECQ']
    # KL: 0.22 ± 0.02 best, 0.23 ± 0.02 ties with it, 0.40 does not
    assert '**0.2200 ± 0.0200**' in by_impl['reference BRECQ'] and '**0.2300 ± 0.0200**' in by_impl['mmbrecq default']
    assert '| 0.4000 ± 0.0000 |' in by_impl["mmbrecq input_mix='qdrop'"]
    assert 'better (+4.50) / tie (+0.0100) vs reference BRECQ' in by_impl['mmbrecq default']
    assert by_impl["mmbrecq input_mix='qdrop'"].endswith('| – |')  # no reference QDrop rows
    assert sum(line.startswith('| W4A4') for line in lines) == 1 and not any('W3A3' in line for line in lines)


def test_table_from_json(tmp_path, capsys, monkeypatch):
    saved = dict(rows=_rows('w4a4', 'brecq', [98.0, 99.0], [0.01, 0.02]), settings=['w4a4'], impls=['brecq'],
                 float_top1=99.44, header='digits resnet18')
    path = tmp_path / 'rows.json'
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(sys, 'argv', ['bench_vs_reference.py', '--table-from', str(path)])
    bench.main()
    out = capsys.readouterr().out
    assert out.startswith('digits resnet18') and '| W4A4 | mmbrecq default | 2 | **98.50 ± 0.50** |' in out


def test_bad_inputs_name_the_option(tmp_path):
    with pytest.raises(SystemExit, match='wXaY'):
        bench.parse_setting('4a4')
    args = argparse.Namespace(brecq_ref=str(tmp_path), qdrop_ref=None, impls=['ref_brecq'])
    with pytest.raises(SystemExit, match='--brecq-ref'):  # a folder that is not a BRECQ checkout
        bench.reference_paths(args)


def test_missing_checkout_skips_with_a_message(capsys, monkeypatch):
    monkeypatch.delenv('QDROP_REFERENCE', raising=False)
    assert bench.reference_paths(argparse.Namespace(brecq_ref=None, qdrop_ref=None, impls=['ref_qdrop'])) == {}
    assert 'reference QDrop rows skipped: no checkout (pass --qdrop-ref PATH or set QDROP_REFERENCE)' \
        in capsys.readouterr().out


@pytest.mark.slow
def test_end_to_end_few_iterations(tmp_path, monkeypatch):
    """The whole benchmark for one setting and seed at 2 iterations per unit (the reference rows
    only where a checkout is given in the environment)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / 'rows.json'
    monkeypatch.setattr(sys, 'argv', ['bench_vs_reference.py', '--settings', 'w4a4', '--seeds', '0', '--iters', '2',
                                      '--num-samples', '64', '--json', str(out), '--log-dir', str(tmp_path)])
    bench.main()
    saved = json.loads(out.read_text())
    impls = {r['impl'] for r in saved['rows']}
    assert {'brecq', 'brecq_qdrop'} <= impls
    for env, key in (('BRECQ_REFERENCE', 'ref_brecq'), ('QDROP_REFERENCE', 'ref_qdrop')):
        assert (key in impls) == bool(os.environ.get(env))
    assert all(0 <= r['top1'] <= 100 and r['kl'] >= 0 for r in saved['rows'])
    assert all(r['float_logit_diff'] < 1e-4 for r in saved['rows'] if r['impl'].startswith('ref_'))
