"""The detector configs under ``configs/brecq/`` (COCO Faster R-CNN / RetinaNet, and the
digits detection demo): they load, ``tools/ptq.py`` accepts them, COCO ones name the
weights mmdet publishes for the config they inherit, and the model swaps with the
8-bit layers the config promises.

Each family's float model is built once (random init) and deep-copied per bit setting;
ranges use min-max initialisation (see test_configs.py for why)."""
import copy
import re
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmbrecq
from mmbrecq.config import calib_config, recon_config
from mmbrecq.modules import QuantConfig, QuantLayerMixin
from mmbrecq.reconstruction import find_units, unit_layers

from _tools import load_tool

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs' / 'brecq'
COCO_FAMILIES = ('faster-rcnn_r50_fpn', 'faster-rcnn_r18_fpn', 'retinanet_r50_fpn', 'retinanet_r18_fpn')
COCO_BITS = ('w4a8', 'w4a4', 'w2a8')  # the paper's detection settings
COCO_FILES = [f'{f}_{b}.py' for f in COCO_FAMILIES for b in COCO_BITS]
NAME_RE = re.compile(r'^(?P<family>.+)_w(?P<w>\d+)a(?P<a>\d+)\.py$')
MMDET_CONFIGS = Path(__import__('mmdet').__file__).parent / '.mim' / 'configs'
FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _load(name):
    return Config.fromfile(str(CONFIG_DIR / name))


def _bits(name):
    m = NAME_RE.match(name)
    return m['family'], int(m['w']), int(m['a'])


def _params(files):
    return [pytest.param(f, id=f[:-3]) for f in files]


DIGITS_FILES = sorted(p.name for p in CONFIG_DIR.glob('digits_det_*.py'))


def test_every_digits_detection_config_exists():
    expected = {f'digits_det_{d}_{b}.py' for d in ('retinanet', 'faster-rcnn')
                for b in ('w8a8', 'w4a8', 'w4a4', 'w2a8')}
    assert set(DIGITS_FILES) == expected


@pytest.mark.parametrize('name', _params(DIGITS_FILES))
def test_digits_detection_config_is_valid(name):
    cfg = _load(name)
    _, w, a = _bits(name)
    qcfg = QuantConfig(cfg.quant_cfg)
    assert (qcfg.w_bits, qcfg.a_bits) == (w, a) and 'first' in qcfg.keep_8bit
    calib_config(qcfg['calib'])
    recon = dict(qcfg['recon'])
    recon.pop('type')
    recon_config(recon)
    assert cfg.test_evaluator['type'] == 'CocoMetric' and cfg.default_scope == 'mmdet'
    assert (ROOT / cfg.float_checkpoint).is_file()
    assert 'mmbrecq' in cfg.custom_imports['imports']


def test_every_coco_config_exists():
    present = {p.name for p in CONFIG_DIR.glob('*.py') if p.name.startswith(('faster-rcnn_', 'retinanet_'))}
    assert present == set(COCO_FILES)


@pytest.mark.parametrize('name', _params(COCO_FILES))
def test_coco_config_is_valid_and_uses_the_detection_recipe(name):
    cfg = _load(name)
    _, w, a = _bits(name)
    qcfg = QuantConfig(cfg.quant_cfg)
    assert (qcfg.w_bits, qcfg.a_bits) == (w, a)
    calib = calib_config(qcfg['calib'])
    recon = dict(qcfg['recon'])
    recon.pop('type')
    recon = recon_config(recon)
    assert calib['num_samples'] == 64 and calib['split'] == 'train' and calib['pad_to'] == 'max'
    assert recon['iters'] == 20000 and recon['loss'] == 'fisher_diag' and recon['task_loss'] is None
    assert cfg.test_evaluator['type'] == 'CocoMetric' and cfg.default_scope == 'mmdet'
    assert 'first' in qcfg.keep_8bit


def _metafile_weights(base):
    rel = base.split('::', 1)[1]
    models = yaml.safe_load((MMDET_CONFIGS / Path(rel).parent / 'metafile.yml').read_text())['Models']
    return {m.get('Config'): m.get('Weights') for m in models}


@pytest.mark.parametrize('name', _params(COCO_FILES))
def test_coco_float_checkpoint_is_mmdets_for_the_inherited_config(name):
    cfg = _load(name)
    ckpt = cfg.get('float_checkpoint')
    if name.startswith('faster-rcnn_r18'):  # mmdet publishes no such weights: --checkpoint
        assert ckpt is None
        return
    base = re.search(r"^_base_ = \['(mmdet::[^']+)'", (CONFIG_DIR / name).read_text(), re.M).group(1)
    assert _metafile_weights(base)['configs/' + base.split('::', 1)[1]] == ckpt


@pytest.mark.parametrize('name', _params(COCO_FILES[::3]))
def test_coco_config_accepted_by_ptq_tool(name, tmp_path):
    ptq = load_tool('ptq')
    argv = [str(CONFIG_DIR / name), '--work-dir', str(tmp_path / 'work')]
    if _load(name).get('float_checkpoint') is None:
        (tmp_path / 'f.pth').write_bytes(b'')
        argv += ['--checkpoint', str(tmp_path / 'f.pth')]
    cfg = ptq.build_ptq_config(ptq.parse_args(argv))
    assert cfg.test_cfg['type'] == 'mmbrecq.PTQLoop'
    loader = cfg.quant_cfg.calib.dataloader
    assert loader.dataset.type == 'CocoDataset' and 'batch_sampler' in loader  # popped at calibration
    assert cfg.train_dataloader is None and not (tmp_path / 'work').exists()


_MODELS = {}


def _float_model(name, cfg):
    family, _, _ = _bits(name)
    if family not in _MODELS:
        import mmdet.utils
        from mmdet.registry import MODELS
        mmdet.utils.register_all_modules(init_default_scope=False)
        torch.manual_seed(0)
        with DefaultScope.overwrite_default_scope('mmdet'):
            _MODELS[family] = MODELS.build(cfg.model).eval()
    return _MODELS[family]


@pytest.mark.parametrize('name', _params([f for f in COCO_FILES if f.endswith(('w4a8.py', 'w2a8.py'))]))
def test_coco_model_swaps_with_the_promised_8bit_layers(name):
    cfg = _load(name)
    _, w, a = _bits(name)
    float_model = _float_model(name, cfg)
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), dict(cfg.quant_cfg, **FAST))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    eight = {'backbone.conv1'} | {p for p in cfg.quant_cfg.keep_8bit if p != 'first'}
    for n, m in layers.items():
        assert m.weight_quantizer.bits == (8 if n in eight else w), n
    units = find_units(model)
    covered = sorted(f'{u.name}.{r}' if r else u.name for u in units for r in unit_layers(u))
    assert covered == sorted(layers)
    kinds = {u.kind for u in units}
    assert 'Bottleneck' in kinds if '_r50_' in name else 'BasicBlock' in kinds
