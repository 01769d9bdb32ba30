"""Every config under ``configs/brecq/`` loads, is valid for ``tools/ptq.py``, names real
float weights, and its model builds with mmpretrain and swaps with ``quantize_model``.

Speed: each model family is built once (module-level cache, no ``init_weights``) and
deep-copied for each bit setting; the swap uses min-max range initialisation instead of
the default Lp search (the bits, keep_8bit and block-rule placement under test do not
depend on how ranges are initialised, and the Lp search is covered by the quantizer tests
and the end-to-end runs in test_tools_ptq.py).
"""
import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import DefaultScope
from torch import nn

import mmbrecq
from mmbrecq.config import calib_config, recon_config
from mmbrecq.modules import QuantConfig, QuantLayerMixin, quantizers_of
from mmbrecq.reconstruction import find_units, unit_layers
from mmbrecq.registry import RECONSTRUCTORS

from _tools import load_tool

torch.set_num_threads(1)  # 2-core CI

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs' / 'brecq'
#: detector configs are tested in test_configs_detection.py
DETECTION_PREFIXES = ('faster-rcnn_', 'retinanet_', 'digits_det_')
#: transformer configs are tested in test_configs_transformer.py
TRANSFORMER_PREFIXES = ('deit-', 'vit-', 'swin-', 'digits_demo_vit_')
FILES = sorted(p.name for p in CONFIG_DIR.glob('*.py')
               if not p.name.startswith(DETECTION_PREFIXES + TRANSFORMER_PREFIXES))
NAME_RE = re.compile(r'^(?P<family>.+)_w(?P<w>\d+)a(?P<a>\d+)\.py$')
#: mixed precision: <family>_mp_w<W>size_a<A>.py, budget = the size of uniform W<W> weights
MP_RE = re.compile(r'^(?P<family>.+)_mp_w(?P<w>\d+)size_a(?P<a>\d+)\.py$')
MP_CONFIGS = {'digits_demo_mp_w3size_a4.py', 'resnet18_mp_w4size_a4.py'}
MODEL_ZOO = ('resnet18', 'resnet50', 'mobilenet-v2', 'regnetx-400mf', 'regnetx-600mf')
BITS = ('w4a32', 'w3a32', 'w2a32', 'w4a4', 'w2a4')
#: families beyond the paper (mmbrecq/blocks/mobile_convnext.py) and their bit settings
MODERN_ZOO = {'convnext-tiny': ('w4a4', 'w4a32'), 'efficientnet-b0': ('w4a4', 'w4a32'),
              'mobilenet-v3-large': ('w4a4', 'w4a32', 'w6a6')}
DIGITS_CHECKPOINT = 'checkpoints/digits_resnet18_float.pth'  # tools/train_digits.py --out default
MMPRETRAIN_CONFIGS = Path(__import__('mmpretrain').__file__).parent / '.mim' / 'configs'

FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _family(name):
    m = MP_RE.match(name) or NAME_RE.match(name)
    assert m, f'{name}: config names are <family>_w<W>a<A>.py (or <family>_mp_w<W>size_a<A>.py)'
    return m['family'], int(m['w']), int(m['a'])


def _params(files=FILES):
    return [pytest.param(f, id=f[:-3]) for f in files]


def _load(name):
    return Config.fromfile(str(CONFIG_DIR / name))


def _base_of(name):
    m = re.search(r"^_base_ = \[?'(mmpretrain::[^']+)'", (CONFIG_DIR / name).read_text(), re.M)
    return m and m.group(1)


# ---------------------------------------------------------------------------------------
# the set of configs
# ---------------------------------------------------------------------------------------
def test_model_zoo_is_complete():
    expected = {f'{fam}_{bits}.py' for fam in MODEL_ZOO for bits in BITS}
    expected |= {f'{fam}_{bits}.py' for fam, settings in MODERN_ZOO.items() for bits in settings}
    expected |= {'digits_demo_w4a4.py', 'digits_demo_w2a4.py'}
    expected |= MP_CONFIGS
    assert set(FILES) == expected


# ---------------------------------------------------------------------------------------
# loading and quant_cfg
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', _params())
def test_config_loads_with_valid_quant_cfg(name):
    cfg = _load(name)
    _, w, a = _family(name)
    assert 'mmbrecq' in cfg.custom_imports['imports']
    qcfg = QuantConfig(cfg.quant_cfg)  # every key known and valid
    calib = calib_config(qcfg['calib'])
    recon = dict(qcfg['recon'])
    rtype = recon.pop('type', 'BlockReconstructor')
    recon = recon_config(recon)
    assert RECONSTRUCTORS.get(rtype) is not None, rtype

    # the bits in the file name are those of quant_cfg (A32: float activations)
    assert cfg.quant_cfg['w_bits'] == w and qcfg.w_bits == w
    if a == 32:
        assert cfg.quant_cfg['a_bits'] is None and qcfg.a_bits is None
    else:
        assert cfg.quant_cfg['a_bits'] == a and qcfg.a_bits == a
    assert list(qcfg.keep_8bit) == ['first', 'last']
    assert calib['split'] == 'train' and cfg.get('train_dataloader') is not None
    assert cfg.get('test_dataloader') is not None and cfg.get('test_evaluator') is not None

    if name in MP_CONFIGS:  # searched bits under the size of uniform W<w>, first/last fixed
        mp = qcfg['mixed_precision']
        assert mp['budget'] == dict(size_mb=f'uniform_w{w}') and tuple(mp['candidates']) == (2, 4, 8)
    else:
        assert qcfg['mixed_precision'] is None
    if not name.startswith('digits_demo'):  # the paper's recipe, as the comments claim
        assert calib['num_samples'] == 1024 and calib['batch_size'] == 32
        assert recon['iters'] == 20000 and recon['batch_size'] == 32
        assert recon['lam'] == (0.1 if name.startswith('mobilenet-v2') else 0.01)
        assert tuple(recon['b_range']) == (20, 2) and recon['warmup'] == 0.2
        assert recon['loss'] == 'fisher_diag' and recon['input_mix'] == 'quant'


@pytest.mark.parametrize('name', _params())
def test_config_accepted_by_ptq_tool(name, tmp_path):
    """``tools/ptq.py``'s own validation (a URL checkpoint is not downloaded there)."""
    ptq = load_tool('ptq')
    argv = [str(CONFIG_DIR / name), '--work-dir', str(tmp_path / 'work')]
    if not str(_load(name).get('float_checkpoint') or '').startswith('https://'):
        ckpt = tmp_path / 'float.pth'
        ckpt.write_bytes(b'')
        argv += ['--checkpoint', str(ckpt)]
    cfg = ptq.build_ptq_config(ptq.parse_args(argv))
    assert cfg.test_cfg['type'] == 'mmbrecq.PTQLoop'
    hooks = {h['type'] for h in cfg.custom_hooks}
    assert {'mmbrecq.QuantCheckpointHook', 'mmbrecq.ReconLossPlotHook'} <= hooks
    assert cfg.quant_cfg.calib.dataloader is not None and cfg.train_dataloader is None
    assert not (tmp_path / 'work').exists()  # validation writes nothing


# ---------------------------------------------------------------------------------------
# float checkpoints
# ---------------------------------------------------------------------------------------
def _metafile_weights(base):
    """``{config path: {weights URLs}}`` of the mmpretrain metafile next to the base config
    (one config may have several published weights, e.g. ConvNeXt's in-1k and in-21k ones)."""
    rel = base.split('::', 1)[1]
    meta = MMPRETRAIN_CONFIGS / Path(rel).parent / 'metafile.yml'
    models = yaml.safe_load(meta.read_text())['Models']
    out = {}
    for m in models:
        out.setdefault(m.get('Config'), set()).add(m.get('Weights'))
    return out


@pytest.mark.parametrize('name', _params())
def test_float_checkpoint(name):
    ckpt = _load(name).get('float_checkpoint')
    if name.startswith('regnetx-600mf'):  # no mmpretrain weights: --checkpoint
        assert ckpt is None
    elif name.startswith('digits_demo'):  # committed to the repository, relative to its root
        assert ckpt == DIGITS_CHECKPOINT
        assert (ROOT / ckpt).is_file(), f'{ckpt} is missing: python tools/train_digits.py writes it'
    else:
        assert isinstance(ckpt, str) and ckpt.startswith('https://download.openmmlab.com/'), ckpt
        assert ckpt.endswith('.pth')
        # the weights mmpretrain publishes for the very config this one inherits
        base = _base_of(name)
        assert base, f'{name} does not inherit an mmpretrain config'
        weights = _metafile_weights(base)
        assert ckpt in weights.get('configs/' + base.split('::', 1)[1], set())


# ---------------------------------------------------------------------------------------
# model build and swap
# ---------------------------------------------------------------------------------------
_FLOAT_MODELS = {}


def _float_model(name, cfg):
    """The family's float model, built once per session (random init, eval mode)."""
    family, _, _ = _family(name)
    if family not in _FLOAT_MODELS:
        from mmpretrain.registry import MODELS
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            _FLOAT_MODELS[family] = MODELS.build(cfg.model).eval()
    return _FLOAT_MODELS[family]


def _input_size(cfg):
    return 32 if cfg.model['backbone']['type'] == 'ResNet_CIFAR' else 64


@pytest.mark.parametrize('name', _params())
def test_model_builds_and_swaps(name):
    cfg = _load(name)
    _, w, a = _family(name)
    float_model = _float_model(name, cfg)
    float_layers = [n for n, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # the classifier: head.fc, or the last of a stacked head (MobileNetV3)
    assert float_layers and float_layers[-1] in ('head.fc', 'head.layers.1.fc')

    model = mmbrecq.quantize_model(copy.deepcopy(float_model), dict(cfg.quant_cfg, **FAST))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    assert list(layers) == float_layers  # every Conv2d/Linear swapped, in place
    first, last = float_layers[0], float_layers[-1]
    for n, m in layers.items():
        assert m.weight_quantizer.bits == (8 if n in (first, last) else w), n

    acts = quantizers_of(model, 'act')
    if a == 32:  # float activations everywhere, keep_8bit layers included
        assert acts == []
        assert all(m.input_quantizer is None for m in layers.values())
    else:
        assert {q.bits for q in acts} == {a, 8}
        for n in (first, last):  # the image and the classifier's input stay 8-bit
            assert layers[n].input_quantizer is not None and layers[n].input_quantizer.bits == 8, n

    # reconstruction units: blocks plus single layers, together covering every layer once
    units = find_units(model)
    assert len(units) >= 3 and units[-1].name == last
    assert any(u.is_block for u in units)  # every zoo family has a block rule
    covered = [f'{u.name}.{rel}' if rel else u.name for u in units for rel in unit_layers(u)]
    assert sorted(covered) == sorted(float_layers)

    # the swapped model runs (activation ranges calibrated on one small batch)
    size = _input_size(cfg)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    forward = lambda m, b: m(b, mode='tensor')  # noqa: E731
    mmbrecq.calibrate_activations(model, [x], forward)
    with torch.no_grad():
        out = forward(model, x)
    assert out.shape == (2, cfg.model['head']['num_classes']) and torch.isfinite(out).all()


def test_digits_checkpoint_fits_the_demo_model():
    from mmbrecq.utils import load_checkpoint_file
    name = 'digits_demo_w4a4.py'
    cfg = _load(name)
    ckpt = load_checkpoint_file(str(ROOT / cfg.float_checkpoint))
    state = ckpt.get('state_dict', ckpt)
    model = copy.deepcopy(_float_model(name, cfg))
    model.load_state_dict(state, strict=True)


def test_metafile_lists_every_config():
    """configs/brecq/metafile.yml (OpenMMLab model index) names each config once; ``Results``
    hold only what this project measured (``Status: measured``), paper figures stay in
    ``Metadata.Paper Results``, and a row without a measurement says ``not measured``."""
    import yaml
    meta = yaml.safe_load((CONFIG_DIR / 'metafile.yml').read_text())
    listed = sorted(m['Config'].split('/')[-1] for m in meta['Models'])
    assert listed == sorted(p.name for p in CONFIG_DIR.glob('*.py'))
    for m in meta['Models']:
        assert (Path(__file__).parents[1] / m['Config']).is_file()
        status = m['Metadata']['Status']
        assert status.startswith(('measured', 'not measured')), m['Name']
        assert bool(m['Results']) == status.startswith('measured'), m['Name']
        for r in m['Results'] or []:
            metric = 'box AP' if r.get('Task') == 'Object Detection' else 'Top 1 Accuracy'
            assert 0 < r['Metrics'][metric] <= 100
