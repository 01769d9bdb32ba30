"""The transformer configs under ``configs/brecq/``: the model zoo (DeiT-T/S/B, ViT-B, Swin-T/S at
W4A4, W6A6 and W4A32) and the digits ViT demo. Each loads, passes ``tools/ptq.py``'s validation, names
the weights mmpretrain publishes for the config it inherits (or the committed demo checkpoint),
and its model swaps into transformer block units with quantized attention matmuls."""
import copy
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from test_configs import _base_of, _metafile_weights

import mmbrecq
from mmbrecq.modules import QuantConfig
from mmbrecq.modules.quant_attention import MATMUL_QUANTIZERS, attention_twin
from mmbrecq.reconstruction import find_units

from _tools import load_tool

torch.set_num_threads(1)  # 2-core CI

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs' / 'brecq'
ZOO = ('deit-tiny', 'deit-small', 'deit-base', 'vit-base-p16', 'swin-tiny', 'swin-small')
ZOO_FILES = [f'{fam}_{bits}.py' for fam in ZOO for bits in ('w4a4', 'w6a6', 'w4a32')]
DEMO_FILES = [f'digits_demo_vit_w{b}a{b}.py' for b in (4, 6, 8)]
FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _load(name):
    return Config.fromfile(str(CONFIG_DIR / name))


def test_the_set_of_transformer_configs():
    found = {p.name for p in CONFIG_DIR.glob('*.py')
             if p.name.startswith(('deit-', 'vit-', 'swin-', 'digits_demo_vit'))}
    assert found == set(ZOO_FILES + DEMO_FILES)


@pytest.mark.parametrize('name', ZOO_FILES + DEMO_FILES)
def test_config_valid_and_accepted_by_ptq_tool(name, tmp_path):
    cfg = _load(name)
    w, a = map(int, re.search(r'_w(\d+)a(\d+)\.py$', name).groups())
    qcfg = QuantConfig(cfg.quant_cfg)
    assert qcfg.w_bits == w and list(qcfg.keep_8bit) == ['first', 'last']
    if a == 32:  # float activations: no act quantizer anywhere (not even the attention matmuls')
        assert cfg.quant_cfg['a_bits'] is None and qcfg.a_bits is None
    else:
        assert qcfg.a_bits == a
    ptq = load_tool('ptq')
    argv = [str(CONFIG_DIR / name), '--work-dir', str(tmp_path / 'work')]
    ckpt = cfg.get('float_checkpoint')
    if name in DEMO_FILES:
        assert ckpt == 'checkpoints/digits_vit_float.pth' and (ROOT / ckpt).is_file()
    else:  # the weights mmpretrain publishes for the config this one inherits
        assert ckpt in _metafile_weights(_base_of(name)).get('configs/' + _base_of(name).split('::', 1)[1], ())
        fake = tmp_path / 'float.pth'
        fake.write_bytes(b'')
        argv += ['--checkpoint', str(fake)]
    cfg = ptq.build_ptq_config(ptq.parse_args(argv))
    assert cfg.test_cfg['type'] == 'mmbrecq.PTQLoop'



@pytest.mark.parametrize('name', ['deit-tiny_w4a4.py', 'swin-tiny_w6a6.py', 'digits_demo_vit_w4a4.py'])
def test_zoo_model_swaps_into_transformer_units(name):
    """The full-size model (random weights): block units, 4 matmul quantizers per attention."""
    cfg = _load(name)
    from mmpretrain.registry import MODELS
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        float_model = MODELS.build(cfg.model).eval()
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), dict(cfg.quant_cfg, **FAST))
    units = find_units(model)
    blocks = [u for u in units if u.is_block]
    n_attn = sum(attention_twin(m) is not None for m in float_model.modules())
    # default unit: attention and MLP halves
    assert [u.kind for u in blocks] == ['Attention', 'MLP'] * n_attn
    mm = [n for n, _ in model.named_modules() if n.rpartition('.')[2] in MATMUL_QUANTIZERS]
    assert len(mm) == 4 * n_attn


def test_w4a32_zoo_model_quantizes_weights_only():
    """W4A32: the same block units, 4-bit weights (8-bit first/last), no activation quantizer,
    attention matmuls float (the twin runs the float module's SDPA)."""
    from mmbrecq.modules import QuantLayerMixin, quantizers_of
    cfg = _load('deit-tiny_w4a32.py')
    from mmpretrain.registry import MODELS
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        float_model = MODELS.build(cfg.model).eval()
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), dict(cfg.quant_cfg, **FAST))
    n_attn = sum(attention_twin(m) is not None for m in float_model.modules())
    assert [u.kind for u in find_units(model) if u.is_block] == ['Attention', 'MLP'] * n_attn
    assert quantizers_of(model, 'act') == []
    layers = [m for m in model.modules() if isinstance(m, QuantLayerMixin)]
    assert sorted({m.weight_quantizer.bits for m in layers}) == [4, 8]
    assert all(m.input_quantizer is None for m in layers)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, mode='tensor')
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
