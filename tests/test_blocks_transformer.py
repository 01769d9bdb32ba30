"""DeiT, ViT and Swin from mmpretrain's own configs (small inputs, few layers, random weights):
block units, every attention matmul quantized, all forward modes, exact float when quantization
is off, reconstruction, and tools/export.py --format onnx reproduced by onnxruntime."""
import copy

import pytest
import torch
from mmengine.config import Config
from mmengine.hub import get_config

import mmbrecq
from mmbrecq.modules import quantizers_of, set_quant_state
from mmbrecq.modules.quant_attention import MATMUL_QUANTIZERS
from mmbrecq.quantizers import Log2Quantizer, LSQQuantizer
from mmbrecq.reconstruction import find_units

from _tools import load_tool

torch.set_num_threads(1)  # 2-core CI

#: config, model overrides (a CPU-sized version of the same architecture), input size, attention modules
CASES = {
    'deit': ('deit/deit-tiny_4xb256_in1k.py',
             dict(backbone=dict(arch=dict(_delete_=True, embed_dims=48, num_layers=2, num_heads=3,
                                          feedforward_channels=192),
                                img_size=32, patch_size=8),
                  head=dict(in_channels=48, num_classes=10)), 32, 2),
    'vit': ('vision_transformer/vit-base-p16_64xb64_in1k.py',
            dict(backbone=dict(arch=dict(_delete_=True, embed_dims=48, num_layers=2, num_heads=4,
                                         feedforward_channels=96),
                               img_size=32, patch_size=8, drop_rate=0.0),
                 head=dict(in_channels=48, hidden_dim=32, num_classes=10)), 32, 2),
    'swin': ('swin_transformer/swin-tiny_16xb64_in1k.py',
             dict(backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[2, 2], num_heads=[1, 2]), img_size=64,
                                window_size=4, out_indices=(1, ), drop_path_rate=0.0),
                  head=dict(in_channels=32, num_classes=10)), 64, 4),
}
#: whole layers as units, post-LayerNorm inputs per-tensor LSQ (no reparameterisation: weights unchanged,
#: so quantization off is the float model bit for bit); the defaults are tested separately below
QCFG = dict(w_bits=4, a_bits=8, weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'), transformer=dict(unit='layer', post_ln=None))
EXPORT = load_tool('export')


def _model_cfg(case):
    name, overrides, _, _ = CASES[case]
    cfg = get_config(f'mmpretrain::{name}')
    cfg.merge_from_dict(dict(model=copy.deepcopy(overrides)))  # merging pops its _delete_ keys
    return cfg


@torch.no_grad()
def _build(case, seed=0):
    from mmpretrain.registry import MODELS
    torch.manual_seed(seed)
    model = MODELS.build(_model_cfg(case).model)
    return randomize_transformer(model, seed + 100).eval()


@torch.no_grad()
def randomize_transformer(model, seed):
    """Non-trivial values where a fresh build has constants: position embeddings, class token,
    relative position bias tables (zeros), LayerNorm affines (1, 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(('pos_embed', 'cls_token')):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        elif name.endswith('relative_position_bias_table'):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 + 0.2)  # channels of different scales
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model


def _images(case, n=4, seed=1):
    size = CASES[case][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tensor(model, x):
    with torch.no_grad():
        return model(x, mode='tensor')


def _quantized(case, qcfg=QCFG):
    float_model = _build(case)
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), qcfg)
    mmbrecq.calibrate_activations(model, [_images(case, 8, seed=0)], lambda m, b: m(b, mode='tensor'))
    return float_model, model


def _matmul_quantizers(model):
    return {n: m for n, m in model.named_modules() if n.rpartition('.')[2] in MATMUL_QUANTIZERS}


@pytest.mark.parametrize('case', sorted(CASES))
def test_units_matmuls_modes_and_float_off(case):
    float_model, model = _quantized(case)
    units = find_units(model)
    blocks = [u for u in units if u.is_block]
    kind = 'SwinBlock' if case == 'swin' else 'TransformerEncoderLayer'
    assert [u.kind for u in blocks] == [kind] * CASES[case][3]
    assert len(units) > len(blocks)  # the patch embedding and the head stay layer units
    # every attention matmul operand quantized, at a_bits: Q, K, V (LSQ) and softmax (log2)
    mm = _matmul_quantizers(model)
    assert len(mm) == 4 * CASES[case][3]
    assert all(q.initialized and q.enabled and q.bits == 8 and q.role == 'act' for q in mm.values())
    assert sum(isinstance(q, Log2Quantizer) for q in mm.values()) == CASES[case][3]
    assert sum(type(q) is LSQQuantizer for q in mm.values()) == 3 * CASES[case][3]
    assert all(any(q is m for m in quantizers_of(model, 'act')) for q in mm.values())
    # no quantizer on the residual stream: blocks have no input quantizer, each Linear has one
    assert all(getattr(u.module, 'input_quantizer', None) is None for u in blocks)
    x = _images(case)
    ref = _tensor(float_model, x)
    out = _tensor(model, x)
    assert out.shape == ref.shape == (4, 10)
    assert not torch.equal(out, ref)
    # quantization off: the float model bit for bit
    set_quant_state(model, False, False)
    assert torch.equal(_tensor(model, x), ref)
    set_quant_state(model, True, True)
    # predict and loss modes
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(i % 10) for i in range(4)]
    with torch.no_grad():
        preds = model(x, samples, mode='predict')
        losses = model(x, copy.deepcopy(samples), mode='loss')
    assert len(preds) == 4 and preds[0].pred_score.shape == (10, )
    assert torch.isfinite(losses['loss'])


@pytest.mark.parametrize('case', ['deit', 'swin'])
def test_halves_units(case):
    qcfg = dict(QCFG, transformer=dict(unit='halves', post_ln=None))
    float_model, model = _quantized(case, qcfg)
    kinds = [u.kind for u in find_units(model) if u.is_block]
    n = CASES[case][3]
    assert kinds == ['Attention', 'MLP'] * n
    assert len(_matmul_quantizers(model)) == 4 * n
    x = _images(case)
    set_quant_state(model, False, False)
    assert torch.equal(_tensor(model, x), _tensor(float_model, x))


@pytest.mark.parametrize('case,unit', [('deit', 'layer'), ('swin', 'layer'), ('swin', 'halves')])
def test_reconstruction_runs_and_lowers_the_error(case, unit):
    """Units run on their cached input tensor alone (Swin's hw_shape / mask remembered)."""
    qcfg = dict(QCFG, a_bits=4, transformer=dict(unit=unit))
    float_model, model = _quantized(case, qcfg)
    calib = [_images(case, 16, seed=s) for s in range(2)]
    x = torch.cat(calib)  # random weights and inputs: the calibration images are the task
    ref = _tensor(float_model, x)
    before = (_tensor(model, x) - ref).pow(2).mean()
    records = mmbrecq.reconstruct(model, calib, dict(iters=200, batch_size=8, progress=False, seed=0,
                                                     loss='mse'), forward=lambda m, b: m(b, mode='tensor'),
                                  logger='silent')
    assert all(r['status'] == 'ok' for r in records)
    kinds = {r['kind'] for r in records}
    assert kinds & {'SwinBlock', 'TransformerEncoderLayer', 'Attention', 'MLP'}
    after = (_tensor(model, x) - ref).pow(2).mean()
    assert torch.isfinite(after) and after < before, (before, after)



@pytest.mark.parametrize('case,unit', [('deit', 'halves'), ('swin', 'halves'), ('deit', 'layer')])
def test_fixed_entry_step(case, unit):
    """``transformer.learn_entry_step=False``: each unit's first Linear keeps its calibrated input
    step (no gradient, not learned), the other steps are learned; default: all learned."""
    from mmbrecq.reconstruction.optimize import step_quantizers
    qcfg = dict(QCFG, a_bits=4, transformer=dict(unit=unit, learn_entry_step=False))
    _, model = _quantized(case, qcfg)
    units = [u for u in find_units(model) if u.is_block]
    entries = []
    for u in units:
        first = next(m for m in u.module.modules() if isinstance(m, torch.nn.Linear))
        entries.append(first.input_quantizer)
        learned = step_quantizers(u)
        assert first.input_quantizer not in learned and learned
        assert all(q.learn_step and q is not first.input_quantizer for q in learned)
    assert all(not q.learn_step and not q.scale.requires_grad for q in entries)
    before = [q.scale.detach().clone() for q in entries]
    others = [q for u in units for q in step_quantizers(u)]
    others_before = [q.scale.detach().clone() for q in others]
    calib = [_images(case, 8, seed=s) for s in range(2)]
    mmbrecq.reconstruct(model, calib, dict(iters=20, batch_size=8, progress=False, seed=0, loss='mse'),
                        forward=lambda m, b: m(b, mode='tensor'), logger='silent')
    assert all(torch.equal(q.scale, b) for q, b in zip(entries, before))
    assert any(not torch.equal(q.scale, b) for q, b in zip(others, others_before))
    # the default learns every step, the entry's included
    _, model = _quantized(case, dict(qcfg, transformer=dict(unit=unit)))
    for u in (u for u in find_units(model) if u.is_block):
        first = next(m for m in u.module.modules() if isinstance(m, torch.nn.Linear))
        assert first.input_quantizer.learn_step and first.input_quantizer in step_quantizers(u)
    with pytest.raises(ValueError, match=r'quant_cfg\.transformer\.learn_entry_step'):
        mmbrecq.QuantConfig(dict(transformer=dict(learn_entry_step='no')))


@pytest.mark.parametrize('case,unit', [('deit', 'halves'), ('swin', 'halves'), ('deit', 'layer')])
def test_entry_step_gradient_sampled(case, unit):
    """``transformer.entry_step_stride``: each unit's first Linear (and no other layer) estimates
    its input step's gradient from every k-th token; the reconstruction learns that step."""
    from mmbrecq.config import DEFAULTS
    qcfg = dict(QCFG, a_bits=4, transformer=dict(unit=unit, entry_step_stride=3))
    _, model = _quantized(case, qcfg)
    units = [u for u in find_units(model) if u.is_block]
    firsts = [next(m for m in u.module.modules() if isinstance(m, torch.nn.Linear)) for u in units]
    strides = {n: m.input_step_grad_stride for n, m in model.named_modules() if hasattr(m, 'input_step_grad_stride')}
    assert {n for n, k in strides.items() if k == 3} == {n for n, m in model.named_modules() if m in firsts}
    assert {k for k in strides.values()} == {1, 3}
    before = [m.input_quantizer.scale.detach().clone() for m in firsts]
    calib = [_images(case, 8, seed=s) for s in range(2)]
    mmbrecq.reconstruct(model, calib, dict(iters=20, batch_size=8, progress=False, seed=0, loss='mse'),
                        forward=lambda m, b: m(b, mode='tensor'), logger='silent')
    assert all(not torch.equal(m.input_quantizer.scale, b) for m, b in zip(firsts, before))
    # the default; learn_entry_step=False leaves nothing to sample
    _, model = _quantized(case, dict(qcfg, transformer=dict(unit=unit)))
    default = DEFAULTS['transformer']['entry_step_stride']
    assert {m.input_step_grad_stride for m in model.modules() if hasattr(m, 'input_step_grad_stride')} == {1, default}
    _, model = _quantized(case, dict(qcfg, transformer=dict(unit=unit, learn_entry_step=False)))
    assert {m.input_step_grad_stride for m in model.modules() if hasattr(m, 'input_step_grad_stride')} == {1}
    with pytest.raises(ValueError, match=r'quant_cfg\.transformer\.entry_step_stride'):
        mmbrecq.QuantConfig(dict(transformer=dict(entry_step_stride=0)))


def _write_ptq_config(case, path):
    name, overrides, _, _ = CASES[case]
    path.write_text(f"_base_ = 'mmpretrain::{name}'\n"
                    "custom_imports = dict(imports=['mmbrecq'], allow_failed_imports=False)\n"
                    f"model = {overrides!r}\n"
                    f"quant_cfg = {QCFG!r}\n")
    return path


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_tool_onnx_matches_onnxruntime(case, tmp_path):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    from mmbrecq.engine import save_quantized
    from mmbrecq.export import onnxruntime_session, qdq_node_counts
    _, model = _quantized(case)
    ckpt = tmp_path / 'quantized.pth'
    save_quantized(model, str(ckpt), QCFG)
    config = _write_ptq_config(case, tmp_path / 'ptq.py')
    assert Config.fromfile(str(config)).model.backbone.img_size == CASES[case][2]
    size = CASES[case][2]
    out = tmp_path / 'model.onnx'
    # mmpretrain's Swin computes window counts from the batch size in Python: its traced graph
    # has a fixed batch; ViT/DeiT are exported at batch 1 and run at batch 3 (dynamic batch)
    batch = '3' if case == 'swin' else '1'
    assert EXPORT.main([str(config), str(ckpt), '--format', 'onnx', '--shape', batch, '3', str(size), str(size),
                        '--out', str(out)]) == 0
    counts = qdq_node_counts(str(out))
    n_attn = CASES[case][3]
    # a Q/DQ pair per uniform quantizer: weights, Linear inputs, and Q, K, V of every attention
    assert counts['QuantizeLinear'] >= 3 * n_attn + 4 * n_attn
    x = _images(case, 3, seed=4)
    sess = onnxruntime_session(str(out), threads=1)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    ref = _tensor(model, x)
    assert got.shape == ref.shape
    # one code of a rounding tie may flip between runtimes; the logits agree to a fraction of a percent
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max(), (got - ref).abs().max()


@pytest.mark.parametrize('case', ['deit', 'swin'])
def test_export_tool_integer_checkpoint_holds_attention_quantizers(case, tmp_path):
    """``--format int``: the attention matmul operands (uniform Q, K, V, log2 softmax) are stored,
    and a fresh float model loaded from the integer checkpoint computes the quantized logits."""
    from mmbrecq.engine import save_quantized
    from mmbrecq.export import load_integer_checkpoint
    _, model = _quantized(case)
    ckpt = tmp_path / 'quantized.pth'
    save_quantized(model, str(ckpt), QCFG)
    config = _write_ptq_config(case, tmp_path / 'ptq.py')
    out = tmp_path / 'model_int.pth'
    assert EXPORT.main([str(config), str(ckpt), '--format', 'int', '--out', str(out)]) == 0
    stored = torch.load(str(out), map_location='cpu', weights_only=True)['attention']
    assert len(stored) == CASES[case][3]
    assert [e['attn_quantizer']['kind'] for e in stored.values()] == ['log2'] * CASES[case][3]
    loaded = load_integer_checkpoint(EXPORT.build_model(Config.fromfile(str(config))), str(out))
    x = _images(case, 3, seed=4)
    assert torch.equal(_tensor(loaded, x), _tensor(model, x))


@pytest.mark.parametrize('case', ['deit', 'swin'])
def test_post_ln_reparam_folded_at_calibration(case, tmp_path):
    """``transformer.post_ln=ChannelReparamQuantizer``: per-channel post-LayerNorm scales folded
    into the LayerNorm and the next Linear when calibration ends; the float function unchanged,
    every activation quantizer per-tensor (ONNX QDQ exports)."""
    from mmbrecq.export import export_onnx, onnxruntime_session
    from mmbrecq.quantizers import ChannelReparamQuantizer
    qcfg = dict(QCFG, transformer=dict(unit='layer', post_ln=dict(type='ChannelReparamQuantizer', init='minmax')))
    float_model, model = _quantized(case, qcfg)
    reparam = [m for m in model.modules() if isinstance(m, ChannelReparamQuantizer)]
    n = CASES[case][3]
    assert len(reparam) == 2 * n  # ln1/norm1 -> qkv and ln2/norm2 -> fc1 of every layer
    assert all(q.folded and q.scale.shape == () for q in reparam)
    x = _images(case, 3, seed=4)
    ref = _tensor(float_model, x)
    set_quant_state(model, False, False)
    torch.testing.assert_close(_tensor(model, x), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    set_quant_state(model, True, True)
    path = str(tmp_path / 'reparam.onnx')
    export_onnx(model, x, path)
    sess = onnxruntime_session(path, threads=1)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert (got - _tensor(model, x)).abs().max() <= 1e-2 * ref.abs().max()


def _swin_reparam(unit, shift_norm1=False):
    """The small Swin with ``post_ln=ChannelReparamQuantizer``, calibrated on 56x56 images:
    14x14 and 7x7 maps, which the window attention pads to multiples of its 4x4 windows."""
    from mmbrecq.blocks import transformer as rules
    float_model = _build('swin')
    qcfg = dict(QCFG, transformer=dict(unit=unit, post_ln=dict(type='ChannelReparamQuantizer', init='minmax')))
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), qcfg)
    if shift_norm1:  # what a plain fold of norm1 would be (the control: padding breaks it)
        for m in model.modules():
            if isinstance(m, rules._types(rules.SWIN_BLOCK)):
                rules.record_post_ln_pair(m, 'norm1', rules.SWIN_QKV, shift=True)
    x = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    mmbrecq.calibrate_activations(model, [x], lambda m, b: m(b, mode='tensor'))
    return float_model, model


@pytest.mark.parametrize('unit', ['layer', 'halves'])
def test_swin_norm1_folded_without_shift_keeps_padding_exact(unit):
    """Swin's first LayerNorm feeds ``w_msa.qkv`` through the window padding: it is folded
    (per-channel scale into ``norm1`` and ``qkv``) without a shift, so the padded zeros still
    mean zero and quantization off gives the float model's logits (to float rounding)."""
    float_model, model = _swin_reparam(unit)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ == 'SwinBlock']
    float_mods = dict(float_model.named_modules())
    assert len(blocks) == CASES['swin'][3]
    for name, block in blocks:
        q = block.attn.w_msa.qkv.input_quantizer
        assert q.folded and q.shift_free and q.scale.shape == () and q.zero_point.shape == ()
        ref_norm, ref_qkv = float_mods[f'{name}.norm1'], float_mods[f'{name}.attn.w_msa.qkv']
        assert not torch.equal(block.norm1.weight, ref_norm.weight)  # folded
        assert torch.equal(block.attn.w_msa.qkv.bias, ref_qkv.bias)  # no shift: bias untouched
        # the fold moves a per-channel factor only: gamma * W (and beta * W) per input channel unchanged
        torch.testing.assert_close(block.norm1.weight * block.attn.w_msa.qkv.weight,
                                   ref_norm.weight * ref_qkv.weight, rtol=1e-5, atol=1e-6)
    ref = _tensor(float_model, x)
    quantized = _tensor(model, x)
    set_quant_state(model, False, False)
    torch.testing.assert_close(_tensor(model, x), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    set_quant_state(model, True, True)
    assert torch.equal(_tensor(model, x), quantized)

    # the control: with a shifted fold of norm1 the padded tokens change, and so do the logits
    _, shifted = _swin_reparam(unit, shift_norm1=True)
    set_quant_state(shifted, False, False)
    assert (_tensor(shifted, x) - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize('case', ['vit', 'swin'])
def test_default_transformer_settings(case):
    """No ``quant_cfg.transformer``: the measured defaults (attention and MLP halves, log-sqrt2
    softmax, per-tensor LSQ on post-LayerNorm inputs); quantization off is the float model."""
    from mmbrecq.quantizers import ChannelReparamQuantizer
    qcfg = {k: v for k, v in QCFG.items() if k != 'transformer'}
    float_model, model = _quantized(case, qcfg)
    n = CASES[case][3]
    assert [u.kind for u in find_units(model) if u.is_block] == ['Attention', 'MLP'] * n
    softmax = [q for q in _matmul_quantizers(model).values() if isinstance(q, Log2Quantizer)]
    assert len(softmax) == n and all(q.base == 'sqrt2' for q in softmax)
    assert not any(isinstance(q, ChannelReparamQuantizer) for q in model.modules())
    x = _images(case, 3, seed=4)
    ref = _tensor(float_model, x)
    set_quant_state(model, False, False)
    assert torch.equal(_tensor(model, x), ref)
