"""quantize_model on real mmpretrain classifiers: units, bits, quantizer placement, modes, state."""
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import mmbrecq
from mmbrecq.modules import QuantConv2d, QuantLayerMixin, QuantLinear, quantizers_of, set_quant_state
from mmbrecq.quantizers import AdaRoundQuantizer, LSQQuantizer
from mmbrecq.reconstruction import find_units, unit_layers

from _models import build_classifier, images

torch.set_num_threads(1)  # 2-core CI: multithreaded CPU convs are much slower here

RESNET18 = 'resnet/resnet18_8xb32_in1k.py'
RESNET50 = 'resnet/resnet50_8xb32_in1k.py'
MOBILENET_V2 = 'mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
REGNETX = 'regnet/regnetx-400mf_8xb128_in1k.py'

# min-max ranges: the Lp search (the default) is too slow for unit tests on 2 CPU cores
FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _forward(model, batch):
    return model(batch, mode='tensor')


_images = images


_build = build_classifier


def _quantized(cfg_name, seed=0, calib=True, **quant_cfg):
    model = mmbrecq.quantize_model(_build(cfg_name, seed), dict(FAST, **quant_cfg))
    if calib:
        mmbrecq.calibrate_activations(model, [_images(8, seed=7)], _forward)
    return model


def _layer_bits(model):
    return {n: (m.weight_quantizer.bits,
                None if m.input_quantizer is None else m.input_quantizer.bits)
            for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


# ---------------------------------------------------------------------------------------
# W8A8 on four architectures: units and agreement with the float model
# ---------------------------------------------------------------------------------------
ARCHS = {
    'resnet18': (RESNET18, 10, ['Conv2d'] + ['BasicBlock'] * 8 + ['Linear']),
    'resnet50': (RESNET50, 18, ['Conv2d'] + ['Bottleneck'] * 16 + ['Linear']),
    'mobilenet_v2': (MOBILENET_V2, 20, ['Conv2d'] + ['InvertedResidual'] * 17 + ['Conv2d', 'Linear']),
    'regnetx_400mf': (REGNETX, 24, ['Conv2d'] + ['Bottleneck'] * 22 + ['Linear']),
}


@pytest.fixture(scope='module', params=sorted(ARCHS))
def w8a8(request):
    cfg_name, n_units, kinds = ARCHS[request.param]
    model = _build(cfg_name)
    x = _images(32, seed=1, size=64)
    with torch.no_grad():
        ref = model(x, mode='tensor')
    float_layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    q = mmbrecq.quantize_model(model, dict(FAST, w_bits=8, a_bits=8))
    assert q is model  # in place
    mmbrecq.calibrate_activations(q, [x], _forward)
    return dict(name=request.param, cfg_name=cfg_name, model=q, x=x, ref=ref, n_units=n_units,
                kinds=kinds, float_layers=float_layers)


def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def test_units_count_and_kinds(w8a8):
    units = find_units(w8a8['model'])
    assert len(units) == w8a8['n_units']
    assert [u.kind for u in units] == w8a8['kinds']
    names = [u.name for u in units]
    assert names[0] in ('backbone.conv1', 'backbone.conv1.conv') and names[-1] == 'head.fc'
    assert len(set(names)) == len(names)
    # units do not nest, and every quantized layer belongs to exactly one unit
    covered = []
    for u in units:
        assert u.is_block == (u.kind not in ('Conv2d', 'Linear'))
        for rel in unit_layers(u):
            covered.append(f'{u.name}.{rel}' if rel else u.name)
    quant_layers = [n for n, m in w8a8['model'].named_modules() if isinstance(m, QuantLayerMixin)]
    assert sorted(covered) == sorted(quant_layers)


STEM_TAILS = {'resnet18': ['Identity', 'ReLU', 'MaxPool2d'], 'resnet50': ['Identity', 'ReLU', 'MaxPool2d'],
              'regnetx_400mf': ['Identity', 'ReLU'],  # RegNet's stem has no max-pool
              'mobilenet_v2': []}


def test_resnet_stem_unit_ends_where_layer1_starts(w8a8):
    units = find_units(w8a8['model'])
    assert [type(m).__name__ for m in units[0].tail] == STEM_TAILS[w8a8['name']]
    assert all(not u.tail for u in units[1:])
    if units[0].tail:  # the unit's output is what the first block reads
        seen = {}
        h = units[1].module.register_forward_pre_hook(lambda m, a: seen.setdefault('x', a[0].clone()))
        set_quant_state(w8a8['model'], False, False)
        try:
            with torch.no_grad():
                w8a8['model'](w8a8['x'][:2], mode='tensor')
                assert torch.equal(units[0].forward(w8a8['x'][:2]), seen['x'])
        finally:
            h.remove()
            set_quant_state(w8a8['model'], True, True)


def test_deep_stem_has_no_tail():
    from mmpretrain.models.backbones import ResNetV1c
    rule = mmbrecq.blocks.MMPretrainResNetStemRule()
    assert rule.layer_tail(ResNetV1c(depth=18), 'conv1') is None  # its stem is a Sequential
    plain = _build(RESNET18).backbone
    assert rule.layer_tail(plain, 'conv1') == ('bn1', 'relu', 'maxpool')
    assert rule.layer_tail(plain, 'layer1') is None


def test_tail_naming_a_missing_module_is_an_error_naming_the_unit():
    from mmbrecq.modules import TAIL_ATTR
    model = _quantized(RESNET18, calib=False)
    setattr(model.backbone.conv1, TAIL_ATTR, ('bn1', 'relu', 'no_such_pool'))
    with pytest.raises(ValueError, match=r"'backbone.conv1'.*\['no_such_pool'\]"):
        find_units(model)


def test_every_conv_and_linear_swapped_in_place(w8a8):
    model = w8a8['model']
    for name, float_layer in w8a8['float_layers'].items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantConv2d if isinstance(float_layer, nn.Conv2d) else QuantLinear), name
        assert q.weight is float_layer.weight, name  # the float Parameter is kept
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())  # all folded


def test_w8a8_tensor_output_agrees_with_float(w8a8):
    model, x, ref = w8a8['model'], w8a8['x'], w8a8['ref']
    with torch.no_grad():
        out = model(x, mode='tensor')
    assert 0 < _rel_err(out, ref) < 0.05
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.9
    # the float reference is the same model with quantization off (BN folding is exact)
    set_quant_state(model, weight=False, act=False)
    try:
        with torch.no_grad():
            off = model(x, mode='tensor')
    finally:
        set_quant_state(model, weight=True, act=True)
    assert _rel_err(off, ref) < 1e-5


def test_w4a4_error_is_much_larger_than_w8a8(w8a8):
    """The W8A8 tolerance above is meaningful: 4 bits visibly degrade the same model."""
    if w8a8['name'] == 'resnet50':
        pytest.skip('ResNet-50 takes > 3 s on 2 CPU cores; RegNetX covers the Bottleneck rule')
    x, ref = w8a8['x'][:8], w8a8['ref'][:8]
    model = mmbrecq.quantize_model(_build(w8a8['cfg_name']), dict(FAST, w_bits=4, a_bits=4))
    mmbrecq.calibrate_activations(model, [x], _forward)
    with torch.no_grad():
        err4 = _rel_err(model(x, mode='tensor'), ref)
        err8 = _rel_err(w8a8['model'](x, mode='tensor'), ref)
    assert err4 > 0.05 and err4 > 4 * err8


def test_all_activation_quantizers_calibrated(w8a8):
    acts = quantizers_of(w8a8['model'], 'act')
    weights = quantizers_of(w8a8['model'], 'weight')
    assert acts and all(q.initialized and not q.observing for q in acts)
    assert all(q.initialized for q in weights)
    assert all(q.bits == 8 for q in acts + weights)
    assert all(isinstance(q, LSQQuantizer) for q in acts)
    assert all(isinstance(q, AdaRoundQuantizer) for q in weights)


# ---------------------------------------------------------------------------------------
# W4A4 ResNet-18: bits and placement of the activation quantizers
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def r18():
    return _quantized(RESNET18, w_bits=4, a_bits=4)


def test_first_and_last_layers_are_8bit(r18):
    bb = r18.backbone
    assert bb.conv1.weight_quantizer.bits == 8 and bb.conv1.input_quantizer.bits == 8
    assert r18.head.fc.weight_quantizer.bits == 8
    assert r18.head.fc.input_quantizer.bits == 8
    mid = bb.layer2[1]
    assert mid.conv1.weight_quantizer.bits == 4 and mid.conv2.weight_quantizer.bits == 4
    assert mid.input_quantizer.bits == 4 and mid.conv2.input_quantizer.bits == 4
    bits = _layer_bits(r18)
    eight = sorted(n for n, (w, _) in bits.items() if w == 8)
    assert eight == ['backbone.conv1', 'head.fc']
    assert all(a in (4, None) for n, (w, a) in bits.items() if n not in eight)


@pytest.mark.parametrize('cfg_name', [RESNET18, RESNET50])
def test_reference_convention_places_bits_as_the_reference_code(cfg_name):
    """``convention='reference'``: the image float, the first layer's output (the input of
    layer1.0, for both of its branches) at 8 bits, the last layer's input at a_bits; the
    weights of both ends at 8 bits as in the default convention."""
    model = _quantized(cfg_name, calib=False, w_bits=4, a_bits=4, convention='reference')
    bb = model.backbone
    assert bb.conv1.weight_quantizer.bits == 8 and bb.conv1.input_quantizer is None
    assert bb.layer1[0].input_quantizer.bits == 8
    assert model.head.fc.weight_quantizer.bits == 8 and model.head.fc.input_quantizer.bits == 4
    assert bb.layer1[1].input_quantizer.bits == 4 and bb.layer2[0].input_quantizer.bits == 4
    bits = _layer_bits(model)
    assert sorted(n for n, (w, _) in bits.items() if w == 8) == ['backbone.conv1', 'head.fc']
    assert all(a in (4, None) for n, (w, a) in bits.items() if not n.startswith('backbone.layer1.0.'))


def test_weight_quantizers_are_per_channel(r18):
    conv = r18.backbone.layer3[0].conv2
    assert conv.weight_quantizer.num_channels == conv.out_channels == 256
    assert conv.weight_quantizer.alpha.shape == conv.weight.shape
    assert r18.head.fc.weight_quantizer.num_channels == 1000
    assert all(q.num_channels is None for q in quantizers_of(r18, 'act'))


def test_basic_block_quantizer_placement(r18):
    blocks = [m for m in r18.modules() if type(m).__name__ == 'BasicBlock']
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block.input_quantizer, LSQQuantizer)
        assert block.conv1.input_quantizer is None
        assert isinstance(block.conv2.input_quantizer, LSQQuantizer)
        if block.downsample is not None:
            assert all(getattr(m, 'input_quantizer', None) is None for m in block.downsample.modules())
            assert isinstance(block.downsample[0], QuantConv2d)
    assert sum(b.downsample is not None for b in blocks) == 3
    # 8 block inputs + 8 conv2 inputs + the stem input + the head input
    assert len(quantizers_of(r18, 'act')) == 18
    assert len(quantizers_of(r18, 'weight')) == 21


def test_block_input_quantized_once_and_shared_by_both_branches(r18):
    block = r18.backbone.layer2[0]
    seen, calls = {}, []

    def grab(key):
        def hook(module, args):
            seen[key] = args[0]
        return hook

    handles = [
        block.register_forward_pre_hook(grab('raw'), prepend=True),  # before the quant hook
        block.conv1.register_forward_pre_hook(grab('conv1')),
        block.downsample[0].register_forward_pre_hook(grab('downsample')),
        block.input_quantizer.register_forward_hook(lambda m, a, o: calls.append(o)),
    ]
    try:
        with torch.no_grad():
            r18(_images(2, seed=3), mode='tensor')
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 1  # one quantizer call per block forward
    assert seen['conv1'] is seen['downsample']  # the very same quantized tensor
    assert seen['conv1'] is calls[0]
    raw = seen['raw']
    assert not torch.equal(seen['conv1'], raw)
    with torch.no_grad():
        assert torch.equal(seen['conv1'], block.input_quantizer(raw))
    assert seen['conv1'].unique().numel() <= 16  # on the 4-bit grid


@pytest.fixture(scope='module')
def r50():
    return _quantized(RESNET50, calib=False)


@pytest.fixture(scope='module')
def regnet():
    return _quantized(REGNETX, calib=False)


@pytest.mark.parametrize('fixture_name,n_blocks', [('r50', 16), ('regnet', 22)])
def test_bottleneck_quantizer_placement(request, fixture_name, n_blocks):
    model = request.getfixturevalue(fixture_name)
    blocks = [m for m in model.modules() if getattr(m, '_mmbrecq_unit_kind', None) == 'Bottleneck']
    assert len(blocks) == n_blocks
    for block in blocks:
        assert isinstance(block.input_quantizer, LSQQuantizer)
        assert block.conv1.input_quantizer is None
        assert isinstance(block.conv2.input_quantizer, LSQQuantizer)
        assert isinstance(block.conv3.input_quantizer, LSQQuantizer)
        if block.downsample is not None:
            convs = [m for m in block.downsample.modules() if isinstance(m, QuantConv2d)]
            assert len(convs) == 1 and convs[0].input_quantizer is None
    if fixture_name == 'regnet':  # grouped 3x3 convs are swapped too
        assert any(b.conv2.groups > 1 for b in blocks)


def test_inverted_residual_quantizer_placement():
    model = _quantized(MOBILENET_V2, calib=False)
    blocks = [m for m in model.modules() if type(m).__name__ == 'InvertedResidual']
    assert len(blocks) == 17
    n_two = 0
    for block in blocks:
        assert isinstance(block.input_quantizer, LSQQuantizer)
        convs = [m.conv for m in block.conv]
        assert all(isinstance(c, QuantConv2d) for c in convs)
        assert convs[0].input_quantizer is None
        assert all(isinstance(c.input_quantizer, LSQQuantizer) for c in convs[1:])
        n_two += len(convs) == 2
    assert n_two == 1  # layer1's expand_ratio=1 block has no expansion conv
    assert isinstance(model.backbone.conv2.conv.input_quantizer, LSQQuantizer)
    assert model.backbone.conv1.conv.weight_quantizer.bits == 8
    assert model.head.fc.weight_quantizer.bits == 8


# ---------------------------------------------------------------------------------------
# the OpenMMLab model modes keep working
# ---------------------------------------------------------------------------------------
def _data_samples(n):
    from mmpretrain.structures import DataSample
    return [DataSample().set_gt_label(i * 7 % 1000) for i in range(n)]


def test_predict_mode_after_swap(r18):
    x = _images(3, seed=4)
    with torch.no_grad():
        preds = r18(x, _data_samples(3), mode='predict')
        logits = r18(x, mode='tensor')
    assert len(preds) == 3
    scores = torch.stack([p.pred_score for p in preds])
    torch.testing.assert_close(scores, logits.softmax(1))
    assert [int(p.pred_label) for p in preds] == logits.argmax(1).tolist()
    assert [int(p.gt_label) for p in preds] == [0, 7, 14]


def test_loss_mode_after_swap_and_gradients(r18):
    losses = r18(_images(2, seed=5), _data_samples(2), mode='loss')
    assert set(losses) >= {'loss'}
    loss = losses['loss']
    assert loss.ndim == 0 and torch.isfinite(loss)
    try:
        loss.backward()
        assert r18.head.fc.weight.grad is not None
        assert r18.backbone.layer3[0].input_quantizer.scale.grad is not None  # LSQ step learns
        assert r18.backbone.layer3[0].conv1.weight.grad is not None
    finally:
        r18.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------
# state dict round trip
# ---------------------------------------------------------------------------------------
def _extra_states(model):
    return {n: m.get_extra_state() for n, m in model.named_modules()
            if isinstance(m, LSQQuantizer) or isinstance(m, AdaRoundQuantizer)}


def test_state_dict_round_trip_is_bit_exact():
    src = _quantized(RESNET18, seed=0)
    g = torch.Generator().manual_seed(11)
    ada = [(n, m) for n, m in src.named_modules() if isinstance(m, QuantLayerMixin)]
    soft, hard = ada[2:5], ada[5:8]
    for _, layer in soft + hard:
        layer.weight_quantizer.set_rounding('soft', layer.weight)
        with torch.no_grad():
            layer.weight_quantizer.alpha.copy_(torch.randn(layer.weight.shape, generator=g) * 3)
    for _, layer in hard:
        layer.weight_quantizer.set_rounding('hard')
    x = _images(4, seed=6)
    with torch.no_grad():
        ref = src(x, mode='tensor')
    state = src.state_dict()

    dst = _quantized(RESNET18, seed=1, calib=False)  # other weights, BN stats, ranges
    assert not all(q.initialized for q in quantizers_of(dst, 'act'))
    missing, unexpected = dst.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        out = dst(x, mode='tensor')
    assert torch.equal(out, ref)
    assert _extra_states(dst) == _extra_states(src)
    roundings = {n: m.weight_quantizer.rounding for n, m in dst.named_modules()
                 if isinstance(m, QuantLayerMixin)}
    assert [roundings[n] for n, _ in soft] == ['soft'] * 3
    assert [roundings[n] for n, _ in hard] == ['hard'] * 3
    assert sum(r == 'nearest' for r in roundings.values()) == len(roundings) - 6
    # soft and hard rounding do differ from nearest, so the round trip carried them
    with torch.no_grad():
        layer = dst.get_submodule(soft[0][0])
        layer.weight_quantizer.rounding = 'nearest'
        assert not torch.equal(dst(x, mode='tensor'), ref)


def test_state_dict_with_other_bits_is_rejected():
    src = _quantized(RESNET18, calib=False, w_bits=4, a_bits=4, keep_8bit=[])
    dst = _quantized(RESNET18, calib=False, w_bits=3, a_bits=4, keep_8bit=[])
    with pytest.raises(ValueError, match='bit'):
        dst.load_state_dict(src.state_dict())


# ---------------------------------------------------------------------------------------
# overrides and skip
# ---------------------------------------------------------------------------------------
def test_overrides_change_only_the_matched_layers(r18):
    model = _quantized(RESNET18, calib=False,
                       overrides=[dict(pattern='backbone.layer3.*', w_bits=2, a_bits=8),
                                  dict(pattern='backbone.layer4.0.conv2', w_bits=6)])
    base, got = _layer_bits(r18), _layer_bits(model)
    assert base.keys() == got.keys()
    changed = sorted(n for n in base if base[n] != got[n])
    layer3 = sorted(n for n in base if n.startswith('backbone.layer3.'))
    assert changed == sorted(layer3 + ['backbone.layer4.0.conv2'])
    for n in layer3:
        assert got[n][0] == 2 and got[n][1] in (8, None)
    assert got['backbone.layer4.0.conv2'] == (6, 4)
    # the block input quantizer takes the a_bits of the block's first layer
    assert model.backbone.layer3[0].input_quantizer.bits == 8
    assert model.backbone.layer3[1].input_quantizer.bits == 8
    assert model.backbone.layer4[0].input_quantizer.bits == 4
    assert model.backbone.layer2[1].input_quantizer.bits == 4


def test_skip_leaves_matched_layers_float():
    model = _quantized(RESNET18, skip=['backbone.layer4.1.*', 'backbone.layer2.0.downsample.0'])
    layer4_1 = model.backbone.layer4[1]
    assert type(layer4_1.conv1) is nn.Conv2d and type(layer4_1.conv2) is nn.Conv2d
    assert type(model.backbone.layer2[0].downsample[0]) is nn.Conv2d
    assert not hasattr(layer4_1, 'input_quantizer')
    units = find_units(model)
    assert 'backbone.layer4.1' not in [u.name for u in units] and len(units) == 9
    assert isinstance(model.backbone.layer2[0].conv1, QuantConv2d)
    assert isinstance(model.backbone.layer4[0].conv2, QuantConv2d)
    assert isinstance(model.head.fc, QuantLinear) and model.head.fc.weight_quantizer.bits == 8
    n_quant = sum(isinstance(m, QuantLayerMixin) for m in model.modules())
    assert n_quant == 21 - 3
    with torch.no_grad():
        assert torch.isfinite(model(_images(2, seed=8), mode='tensor')).all()


def test_skip_head_fc_leaves_it_float_and_not_a_unit():
    model = _quantized(RESNET18, calib=False, skip=['head.fc'])
    assert type(model.head.fc) is nn.Linear
    assert 'head.fc' not in [u.name for u in find_units(model)]


def test_skipping_a_block_entry_layer_keeps_the_next_layer_input_quantized():
    model = _quantized(RESNET18, calib=False, skip=['backbone.layer2.0.conv1'])
    block = model.backbone.layer2[0]
    assert type(block.conv1) is nn.Conv2d
    assert block.conv2.input_quantizer is not None


def test_set_quant_state_by_role(r18):
    try:
        set_quant_state(r18, weight=True, act=False)
        assert all(q.enabled for q in quantizers_of(r18, 'weight'))
        assert not any(q.enabled for q in quantizers_of(r18, 'act'))
        set_quant_state(r18, weight=False, act=True)
        assert not any(q.enabled for q in quantizers_of(r18, 'weight'))
        assert all(q.enabled for q in quantizers_of(r18, 'act'))
    finally:
        set_quant_state(r18, True, True)


def test_calibrate_requires_reaching_every_quantizer():
    model = _quantized(RESNET18, calib=False)
    with pytest.raises(RuntimeError, match='never reached'):
        mmbrecq.calibrate_activations(model, [_images(2, seed=9)],
                                      lambda m, b: m.backbone.conv1(b))
    assert not any(q.observing for q in quantizers_of(model, 'act'))
