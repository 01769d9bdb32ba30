"""Integer checkpoint (bit-exact round trip, 4-bit packing) and the float checkpoint with baked weights.

The model is an mmpretrain ResNet-18 quantized W4A4 (first/last layer 8-bit), calibrated on
a 32x32 batch, with every other weight quantizer switched to hard AdaRound rounding with
random ``alpha`` (so the exported integers are not plain nearest rounding of the weights).
"""
import copy

import pytest
import torch
from torch import nn

import mmbrecq
from mmbrecq.engine import save_quantized
from mmbrecq.engine.demo import tensor_forward
from mmbrecq.export import (
    bake_float_checkpoint,
    load_integer_checkpoint,
    read_integer_checkpoint,
    save_integer_checkpoint,
    to_integer_checkpoint,
)
from mmbrecq.export.int_checkpoint import pack_nibbles, unpack_nibbles
from mmbrecq.modules import QuantLayerMixin, quantizers_of, set_quant_state

from _models import FAST_QCFG, build_classifier, images, random_hard_rounding, reconstructed_like_resnet18

torch.set_num_threads(1)  # 2-core CI

RESNET18 = 'resnet/resnet18_8xb32_in1k.py'
QCFG = FAST_QCFG


_images = images


def _build(seed=0):
    return build_classifier(RESNET18, seed)


def _tensor(model, x):
    with torch.no_grad():
        return model(x, mode='tensor')


def _quantized(seed=0, qcfg=QCFG):
    return reconstructed_like_resnet18(seed, qcfg)


@pytest.fixture(scope='module')
def qmodel():
    return _quantized()


@pytest.fixture(scope='module')
def x():
    return _images(4, seed=3)


@pytest.fixture(scope='module')
def int_ckpt(qmodel, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('int') / 'r18_int.pth')
    return save_integer_checkpoint(qmodel, QCFG, path)


# ---------------------------------------------------------------------------------------
# integer checkpoint
# ---------------------------------------------------------------------------------------
def test_hard_rounding_differs_from_nearest(qmodel):
    """The fixture's AdaRound decisions are not what nearest rounding would give."""
    layer = qmodel.backbone.layer1[0].conv1
    q = layer.weight_quantizer
    assert q.rounding == 'hard' and qmodel.backbone.layer1[0].conv2.weight_quantizer.rounding == 'nearest'
    hard = q.integer_repr(layer.weight)
    q.rounding = 'nearest'
    try:
        assert (q.integer_repr(layer.weight) != hard).float().mean() > 0.2
    finally:
        q.rounding = 'hard'


def test_round_trip_is_bit_exact(qmodel, int_ckpt, x):
    ref = _tensor(qmodel, x)
    loaded = load_integer_checkpoint(_build(seed=5), int_ckpt)  # other weights and BN statistics
    assert torch.equal(_tensor(loaded, x), ref)
    src_layers = dict((n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantLayerMixin))
    for name, layer in loaded.named_modules():
        if isinstance(layer, QuantLayerMixin):
            assert layer.weight_quantizer.rounding == 'nearest'
            src = src_layers[name]
            # the dequantized weight is the fake-quant weight of the saved model, bit for bit
            assert torch.equal(layer.weight, src.quantized_weight().detach())
            assert torch.equal(layer.weight_quantizer.integer_repr(layer.weight),
                               src.weight_quantizer.integer_repr(src.weight))
    # and the loaded model exports the same integers again
    again = to_integer_checkpoint(loaded, QCFG)
    first = read_integer_checkpoint(int_ckpt)
    for name, entry in first['layers'].items():
        assert torch.equal(again['layers'][name]['weight']['codes'], entry['weight']['codes']), name
        assert torch.equal(again['layers'][name]['weight']['scale'], entry['weight']['scale']), name


def test_contents_bits_and_packing(qmodel, int_ckpt):
    ckpt = torch.load(int_ckpt, map_location='cpu', weights_only=True)  # tensors and builtins only
    assert ckpt['format'] == 'mmbrecq.int.v2' and ckpt['attention'] == {}
    assert ckpt['quant_cfg'] == QCFG
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayerMixin)}
    assert list(ckpt['layers']) == list(layers)
    for name, layer in layers.items():
        entry = ckpt['layers'][name]
        w, wq = entry['weight'], layer.weight_quantizer
        assert ckpt['bits'][name]['weight'] == wq.bits == w['bits']
        assert w['scale'].shape == (layer.weight.shape[0], ) and w['zero_point'].dtype == torch.int32
        assert torch.equal(w['zero_point'].float(), wq.zero_point)
        n = layer.weight.numel()
        if wq.bits <= 4:
            assert w['packing'] == 'nibble' and w['codes'].dtype == torch.uint8
            assert w['codes'].numel() == (n + 1) // 2
        else:
            assert w['packing'] is None and w['codes'].dtype == torch.uint8 and w['codes'].numel() == n
        assert torch.equal(entry['bias'], layer.bias.detach())  # folded BN bias, float
        in_q = layer.input_quantizer
        assert (entry['input'] is None) == (in_q is None)
        if in_q is not None:
            assert entry['input']['bits'] == in_q.bits == ckpt['bits'][name]['input']
            assert torch.equal(entry['input']['scale'], in_q.scale.detach())
    # first and last layer 8-bit (weights and inputs), the rest 4-bit
    assert ckpt['bits']['backbone.conv1'] == dict(weight=8, input=8)
    assert ckpt['bits']['head.fc'] == dict(weight=8, input=8)
    assert ckpt['bits']['backbone.layer2.0.conv1'] == dict(weight=4, input=None)  # block entry layer
    assert ckpt['bits']['backbone.layer2.0.conv2'] == dict(weight=4, input=4)
    # block input quantizers: one per BasicBlock
    assert sorted(ckpt['block_inputs']) == sorted(f'backbone.layer{i}.{j}' for i in range(1, 5) for j in range(2))
    assert all(ckpt['bits'][b] == dict(input=4) for b in ckpt['block_inputs'])
    # nothing of the quantizers leaks into the float state; BN was folded
    assert not any('quantizer' in k for k in ckpt['float_state'])
    assert not any(k.endswith(('.weight', '.bias')) for k in ckpt['float_state'])


def test_unpacked_checkpoint_loads_the_same(qmodel, x, tmp_path):
    packed = to_integer_checkpoint(qmodel, QCFG, pack=True)
    plain = to_integer_checkpoint(qmodel, QCFG, pack=False)
    entry = plain['layers']['backbone.layer1.0.conv1']['weight']
    assert entry['packing'] is None and entry['codes'].dtype == torch.uint8
    assert int(entry['codes'].max()) <= 15
    p_path, u_path = tmp_path / 'packed.pth', tmp_path / 'plain.pth'
    torch.save(packed, p_path)
    torch.save(plain, u_path)
    assert p_path.stat().st_size < 0.6 * u_path.stat().st_size
    loaded = load_integer_checkpoint(_build(seed=2), plain)  # a dict works too
    assert torch.equal(_tensor(loaded, x), _tensor(qmodel, x))


@pytest.mark.parametrize('n', [1, 7, 8, 33])
def test_nibble_packing_round_trip(n):
    g = torch.Generator().manual_seed(n)
    for qmin in (0, -8):
        codes = torch.randint(qmin, qmin + 16, (n, ), generator=g)
        packed = pack_nibbles(codes, qmin)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
        assert torch.equal(unpack_nibbles(packed, qmin, [n]), codes.to(torch.int32))
    # layout: element 2i in the low nibble
    assert pack_nibbles(torch.tensor([1, 2, 3]), 0).tolist() == [0x21, 0x03]
    with pytest.raises(ValueError, match='16 levels'):
        pack_nibbles(torch.tensor([0, 16]), 0)


def test_disabled_activation_quantizer_survives(x):
    model = _quantized(seed=1)
    block_q = model.backbone.layer3[1].input_quantizer
    block_q.enabled = False
    ref = _tensor(model, x)
    loaded = load_integer_checkpoint(_build(seed=4), to_integer_checkpoint(model, QCFG))
    assert loaded.backbone.layer3[1].input_quantizer.enabled is False
    assert torch.equal(_tensor(loaded, x), ref)
    # one disabled before calibration (never initialised) is exported as it is
    model = mmbrecq.quantize_model(_build(seed=1), QCFG)
    model.backbone.layer2[0].conv2.input_quantizer.enabled = False
    mmbrecq.calibrate_activations(model, [_images(8, seed=7)], lambda m, b: m(b, mode='tensor'))
    loaded = load_integer_checkpoint(_build(seed=4), to_integer_checkpoint(model, QCFG))
    q = loaded.backbone.layer2[0].conv2.input_quantizer
    assert not q.enabled and not q.initialized
    assert torch.equal(_tensor(loaded, x), _tensor(model, x))


def test_errors(qmodel, int_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_integer_checkpoint(_build(), str(tmp_path / 'missing.pth'))
    fake = save_quantized(qmodel, str(tmp_path / 'fakequant.pth'), QCFG)
    with pytest.raises(ValueError, match='not an mmbrecq integer checkpoint'):
        load_integer_checkpoint(_build(), fake)
    with pytest.raises(ValueError, match='bit'):  # swapped with other bits than saved
        load_integer_checkpoint(_build(), int_ckpt, quant_cfg=dict(QCFG, w_bits=3))
    with pytest.raises(ValueError, match='quant_cfg'):
        to_integer_checkpoint(qmodel, None)
    with pytest.raises(ValueError, match='no quantized layer'):
        to_integer_checkpoint(_build(), QCFG)
    # mid-reconstruction and uncalibrated models are refused
    soft = _quantized(seed=2)
    layer = soft.backbone.layer1[0].conv1
    layer.weight_quantizer.set_rounding('soft', layer.weight)
    with pytest.raises(ValueError, match='soft rounding'):
        to_integer_checkpoint(soft, QCFG)
    raw = mmbrecq.quantize_model(_build(), QCFG)
    with pytest.raises(RuntimeError, match='calibrate'):
        to_integer_checkpoint(raw, QCFG)
    # a grid that is no (scale, zero point) pair is refused by name, not stored half
    twin_cfg = dict(QCFG, act_quantizer=dict(type='TwinUniformQuantizer', init='minmax'))
    twin = mmbrecq.quantize_model(_build(), twin_cfg)
    mmbrecq.calibrate_activations(twin, [_images(2, seed=7)], lambda m, b: m(b, mode='tensor'))
    with pytest.raises(NotImplementedError, match='TwinUniformQuantizer has no integer checkpoint entry'):
        to_integer_checkpoint(twin, twin_cfg)


# ---------------------------------------------------------------------------------------
# float checkpoint with the quantized weights baked in
# ---------------------------------------------------------------------------------------
def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize('with_template', [True, False], ids=['float_model', 'structural'])
def test_baked_float_checkpoint_loads_into_stock_resnet18(qmodel, x, with_template):
    set_quant_state(qmodel, weight=True, act=False)
    try:
        ref = _tensor(qmodel, x)
        state = bake_float_checkpoint(qmodel, _build(seed=8) if with_template else None)
    finally:
        set_quant_state(qmodel, weight=True, act=True)
    stock = _build(seed=9)  # other weights and BN statistics: all of them get overwritten
    assert list(state) == list(stock.state_dict()) or not with_template
    stock.load_state_dict(state, strict=True)
    out = _tensor(stock, x)
    assert _rel_err(out, ref) < 1e-4
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    # BN layers are identities that carry the folded bias
    bn = stock.backbone.layer1[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.running_mean.any()
    assert torch.equal(bn.bias, qmodel.backbone.layer1[0].conv1.bias.detach())
    # the conv weights are on the 4-bit grid of their quantizer
    q = qmodel.backbone.layer1[0].conv1.weight_quantizer
    w = stock.backbone.layer1[0].conv1.weight
    assert len(torch.unique(torch.round(w / q.scale.view(-1, 1, 1, 1)))) <= 31
    # activation quantization really was off in the reference: with it on, results differ
    assert _rel_err(_tensor(qmodel, x), ref) > 1e-2


def test_baked_weights_follow_the_quantizer_state(qmodel):
    """A disabled weight quantizer bakes the float weight (the quantizer is the truth)."""
    layer = qmodel.head.fc
    layer.weight_quantizer.enabled = False
    try:
        state = bake_float_checkpoint(qmodel)
    finally:
        layer.weight_quantizer.enabled = True
    assert torch.equal(state['head.fc.weight'], layer.weight.detach())
    assert not torch.equal(bake_float_checkpoint(qmodel)['head.fc.weight'], layer.weight.detach())


def test_baked_checkpoint_mismatch_is_reported(qmodel):
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match='does not match the float model'):
        bake_float_checkpoint(qmodel, other)


def test_quantizers_untouched_by_export(qmodel, x):
    ref = _tensor(qmodel, x)
    to_integer_checkpoint(qmodel, QCFG)
    bake_float_checkpoint(qmodel, _build())
    assert torch.equal(_tensor(qmodel, x), ref)
    assert all(q.enabled for q in quantizers_of(qmodel))


# ---------------------------------------------------------------------------------------
# a quantized ViT: the attention matmul operand quantizers (uniform Q, K, V; log2 softmax)
# ---------------------------------------------------------------------------------------
VIT_QCFG = dict(FAST_QCFG)  # quant_cfg.transformer defaults: halves, log-sqrt2 softmax
VIT_REPARAM_QCFG = dict(FAST_QCFG, transformer=dict(post_ln=dict(type='ChannelReparamQuantizer', init='minmax')))


@pytest.fixture(scope='module')
def digits_vit():
    """The committed digits ViT (4 layers) and two batches of 16 preprocessed training images."""
    import os

    from mmbrecq.engine.demo import DIGITS_MODELS, load_float_model, preprocessed_batches
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg, model = load_float_model(*DIGITS_MODELS['vit'])
        batches = preprocessed_batches(cfg, model, 'train', 32, 16, seed=0)
    finally:
        os.chdir(cwd)
    return cfg, model, batches


def _vit_quantized(digits_vit, qcfg):
    """The digits ViT calibrated at ``qcfg``, every other layer in hard rounding with random alpha."""
    _, model, batches = digits_vit
    qmodel = mmbrecq.quantize_model(copy.deepcopy(model), qcfg)
    mmbrecq.calibrate_activations(qmodel, batches[:1], tensor_forward)
    return random_hard_rounding(qmodel)


def _fresh_vit(digits_vit, seed=5):
    """The same architecture with other (random) weights: everything must come from the checkpoint."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = digits_vit[0]
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg.model).eval()


@pytest.mark.parametrize('qcfg', [VIT_QCFG, VIT_REPARAM_QCFG], ids=['default', 'post_ln_reparam'])
def test_vit_round_trip_with_attention_quantizers(digits_vit, qcfg, tmp_path):
    from mmbrecq.modules.quant_attention import MATMUL_QUANTIZERS
    from mmbrecq.quantizers import ChannelReparamQuantizer, Log2Quantizer
    qmodel = _vit_quantized(digits_vit, qcfg)
    x = digits_vit[2][1]
    ref = tensor_forward(qmodel, x)
    path = save_integer_checkpoint(qmodel, qcfg, str(tmp_path / 'vit_int.pth'))
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    attn_names = [n for n, m in qmodel.named_modules() if hasattr(m, 'attach_matmul_quantizers')]
    assert len(attn_names) == 4 and list(ckpt['attention']) == attn_names
    for name in attn_names:
        entries = ckpt['attention'][name]
        assert list(entries) == list(MATMUL_QUANTIZERS)
        assert ckpt['bits'][name] == {a: 4 for a in MATMUL_QUANTIZERS}
        src = qmodel.get_submodule(name)
        for attr, e in entries.items():
            q = getattr(src, attr)
            assert torch.equal(e['scale'], q.scale.detach()) and e['bits'] == q.bits
            if attr == 'attn_quantizer':  # the softmax output: log2 grid, its delta and base
                assert isinstance(q, Log2Quantizer)
                assert (e['type'], e['kind'], e['base'], e['qmin'], e['qmax']) == ('Log2Quantizer', 'log2',
                                                                                   'sqrt2', 0, 15)
            else:
                assert e['kind'] == 'uniform' and e['type'] == 'LSQQuantizer' and 'base' not in e
    reparam = [n for n, e in ckpt['layers'].items() if e['input'] is not None and e['input'].get('folded')]
    assert len(reparam) == (8 if qcfg is VIT_REPARAM_QCFG else 0)  # ln1 -> qkv, ln2 -> fc1 of 4 layers

    loaded = load_integer_checkpoint(_fresh_vit(digits_vit), path)
    assert torch.equal(tensor_forward(loaded, x), ref)
    for name in attn_names:
        for attr in MATMUL_QUANTIZERS:
            a, b = getattr(loaded.get_submodule(name), attr), getattr(qmodel.get_submodule(name), attr)
            assert type(a) is type(b) and torch.equal(a.scale, b.scale) and a.enabled == b.enabled
    folded = [m for m in loaded.modules() if isinstance(m, ChannelReparamQuantizer)]
    assert all(q.folded and not q.pending_fold for q in folded) and len(folded) == len(reparam)
    again = to_integer_checkpoint(loaded, qcfg)
    for name in attn_names:
        for attr, e in again['attention'][name].items():
            assert torch.equal(e['scale'], ckpt['attention'][name][attr]['scale'])


def test_vit_attention_errors(digits_vit):
    qmodel = _vit_quantized(digits_vit, VIT_QCFG)
    ckpt = to_integer_checkpoint(qmodel, VIT_QCFG)
    # a checkpoint of another softmax quantizer than the model's
    other = dict(VIT_QCFG, transformer=dict(softmax=dict(type='Log2Quantizer', base='2')))
    with pytest.raises(ValueError, match=r'attn_quantizer: a log2 quantizer \(Log2Quantizer, base sqrt2\)'):
        load_integer_checkpoint(_fresh_vit(digits_vit), ckpt, quant_cfg=other)
    # a v1-style checkpoint (no attention entries) does not fit a model with attention quantizers
    v1 = dict(ckpt, format='mmbrecq.int.v1')
    v1.pop('attention')
    with pytest.raises(ValueError, match='attention matmul quantizers differ'):
        load_integer_checkpoint(_fresh_vit(digits_vit), v1)
    # a quantizer type the checkpoint cannot describe is named with its module
    from mmbrecq.quantizers import Log2Quantizer

    class OddQuantizer(Log2Quantizer):
        pass

    attn = qmodel.backbone.layers[0].attn
    odd = OddQuantizer(bits=4)
    odd.load_qparams(attn.attn_quantizer.scale.detach(), attn.attn_quantizer.zero_point)
    attn.attn_quantizer = odd
    with pytest.raises(NotImplementedError, match=r'backbone.layers.0.attn.attn_quantizer: OddQuantizer'):
        to_integer_checkpoint(qmodel, VIT_QCFG)
