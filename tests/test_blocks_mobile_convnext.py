"""ConvNeXt, EfficientNet and MobileNetV3 from mmpretrain's own configs (mmbrecq/blocks/mobile_convnext.py).

Each family is built from its installed mmpretrain config with random weights (random
BN statistics, random ConvNeXt layer scales: at their 1e-6 init every ConvNeXt block is
an identity), quantized at W4A4 with min-max ranges, calibrated on one batch of 64x64
images. Checked: the block units (count per kind), quantizer placement (SE branch,
LayerNorm, depthwise convs, Conv2dAdaptivePadding), exact float output with quantization
off, the loss / predict / tensor modes, and ONNX export in onnxruntime.
"""
import copy
from collections import Counter

import pytest
import torch
from mmengine.hub import get_config
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import mmbrecq
from mmbrecq.modules import (
    QuantConv2d,
    QuantConv2dAdaptivePadding,
    QuantLayerMixin,
    fold_bn,
    quantizers_of,
    set_quant_state,
)
from mmbrecq.quantizers import LSQQuantizer
from mmbrecq.reconstruction import find_units, unit_layers

from _models import FAST_QCFG, images, randomize_bn

torch.set_num_threads(1)  # 2-core CI

#: family -> (mmpretrain config, unit kinds and counts)
FAMILIES = {
    'convnext-tiny': ('convnext/convnext-tiny_32xb128_in1k.py',
                      # stem conv + 3 downsampling convs, 3+3+9+3 blocks, the classifier
                      {'Conv2d': 4, 'ConvNeXtBlock': 18, 'Linear': 1}),
    'efficientnet-b0': ('efficientnet/efficientnet-b0_8xb32_in1k.py',
                        # stem and final 1x1 conv (TF "same" padding), 16 MBConv blocks, all with SE
                        {'Conv2dAdaptivePadding': 2, 'InvertedResidualSE': 16, 'Linear': 1}),
    'mobilenet-v3-large': ('mobilenet_v3/mobilenet-v3-large_8xb128_in1k.py',
                           # stem, 15 blocks (8 with SE), last conv, the two head Linears
                           {'Conv2d': 2, 'InvertedResidual': 7, 'InvertedResidualSE': 8, 'Linear': 2}),
}


def _forward(model, x):
    return model(x, mode='tensor')


@torch.no_grad()
def build_float(family, seed=0):
    from mmpretrain.models.backbones.convnext import ConvNeXtBlock
    from mmpretrain.registry import MODELS
    torch.manual_seed(seed)
    model = MODELS.build(get_config(f'mmpretrain::{FAMILIES[family][0]}').model)
    randomize_bn(model, seed + 100)
    g = torch.Generator().manual_seed(seed + 200)
    for m in model.modules():
        if isinstance(m, ConvNeXtBlock):
            m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) * 0.5 + 0.25)
    return model.eval()


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request):
    name = request.param
    model = build_float(name)
    x = images(4, seed=1, size=64)
    with torch.no_grad():
        ref = _forward(model, x)
        folded_model = copy.deepcopy(model)
        fold_bn(folded_model)
        ref_folded = _forward(folded_model, x)
    float_layers = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    q = mmbrecq.quantize_model(model, FAST_QCFG)
    mmbrecq.calibrate_activations(q, [x], _forward)
    return dict(name=name, model=q, x=x, ref=ref, ref_folded=ref_folded, float_layers=float_layers)


def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------
def test_rules_registered_and_resolved():
    """Each rule's lazily resolved import path exists in the pinned mmpretrain (a typo would
    leave the rule matching nothing, silently)."""
    from mmbrecq.registry import BLOCK_RULES
    for name in ('ConvNeXtBlockRule', 'MBInvertedResidualRule', 'MBInvertedResidualSERule', 'EdgeResidualRule',
                 'EdgeResidualSERule'):
        assert len(BLOCK_RULES.get(name)().resolved_types()) == 1, name


def test_edge_residual_units():
    """EfficientNet-EdgeTPU-M: EdgeResidual blocks (no SE) besides MBConv ones. The SE
    variant, built here by hand, is told apart by ``with_se``; its SE convs are in the block."""
    from mmpretrain.models.backbones import EfficientNet
    from mmpretrain.models.backbones.efficientnet import EdgeResidual
    torch.manual_seed(0)
    backbone = EfficientNet(arch='em')
    backbone.eval()  # (EfficientNet.train returns None)
    model = mmbrecq.quantize_model(backbone, FAST_QCFG)
    kinds = Counter(u.kind for u in find_units(model))
    assert kinds['EdgeResidual'] == 10 and kinds['InvertedResidual'] == 14
    block = next(m for m in model.modules() if isinstance(m, EdgeResidual))
    assert isinstance(block.input_quantizer, LSQQuantizer) and not _has_in_q(block.conv1.conv)
    assert _has_in_q(block.conv2.conv)
    se = EdgeResidual(16, 16, 32, se_cfg=dict(channels=32, ratio=4))
    model = mmbrecq.quantize_model(nn.Sequential(nn.Conv2d(3, 16, 1), se, EdgeResidual(16, 16, 32)).eval(),
                                   FAST_QCFG)
    assert [u.kind for u in find_units(model)] == ['Conv2d', 'EdgeResidualSE', 'EdgeResidual']
    assert _has_in_q(se.se.conv1.conv) and _has_in_q(se.se.conv2.conv)


def test_block_units_found(family):
    units = find_units(family['model'])
    assert Counter(u.kind for u in units) == FAMILIES[family['name']][1]
    covered = sorted(f'{u.name}.{rel}' if rel else u.name for u in units for rel in unit_layers(u))
    assert covered == sorted(family['float_layers'])  # every layer in exactly one unit


def test_every_layer_swapped_to_its_twin(family):
    from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
    model = family['model']
    for name, cls in family['float_layers'].items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantLayerMixin) and isinstance(q, cls), name
        assert isinstance(q, QuantConv2dAdaptivePadding) == issubclass(cls, Conv2dAdaptivePadding), name
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())  # depthwise ConvModules too
    if family['name'] == 'efficientnet-b0':  # every conv of EfficientNet pads TF-style
        assert sum(isinstance(m, QuantConv2dAdaptivePadding) for m in model.modules()) > 40


def test_quantization_off_reproduces_the_float_model_exactly(family):
    model, x = family['model'], family['x']
    set_quant_state(model, False, False)
    try:
        with torch.no_grad():
            off = _forward(model, x)
    finally:
        set_quant_state(model, True, True)
    assert torch.equal(off, family['ref_folded'])  # same ops as the BN-folded float model, bit for bit
    assert _rel_err(off, family['ref']) < 1e-5  # and BN folding is exact up to float rounding


def test_modes_run(family):
    from mmpretrain.structures import DataSample
    model, x = family['model'], family['x']
    with torch.no_grad():
        logits = _forward(model, x)
        preds = model(x, mode='predict')
        losses = model(x, [DataSample().set_gt_label(i) for i in range(len(x))], mode='loss')
    assert logits.shape == (4, 1000) and torch.isfinite(logits).all()
    assert 0 < _rel_err(logits, family['ref']) < 1  # quantized: not the float output, close to it
    assert len(preds) == 4 and torch.allclose(torch.stack([p.pred_score for p in preds]), logits.softmax(1))
    assert torch.isfinite(losses['loss'])


# ---------------------------------------------------------------------------------------
# quantizer placement
# ---------------------------------------------------------------------------------------
def _has_in_q(layer):
    return layer.input_quantizer is not None


def test_mbconv_placement_se_branch_and_product():
    """MobileNetV3 block with expansion and SE: the block input is quantized once (pre-hook)
    for the expand conv and the residual; the depthwise conv, both SE convs (the first
    reads the pooled tensor) and the projection (it reads ``x * gate``) have their own."""
    model = mmbrecq.quantize_model(build_float('mobilenet-v3-large'), FAST_QCFG)
    block = model.backbone.layer5  # [5, 120, 40, True, 'ReLU', 1]: expand, SE, residual
    assert block.with_se and block.with_expand_conv and block.with_res_shortcut
    assert isinstance(block.input_quantizer, LSQQuantizer)
    assert not _has_in_q(block.expand_conv.conv)
    for layer in (block.depthwise_conv.conv, block.se.conv1.conv, block.se.conv2.conv, block.linear_conv.conv):
        assert _has_in_q(layer)
    assert len(quantizers_of(block, 'act')) == 5 and len(quantizers_of(block, 'weight')) == 5
    # what the projection's quantizer sees is the SE product, and the SE conv1 the pooled map
    seen = {}
    hooks = [block.se.register_forward_hook(lambda m, a, out: seen.update(se_in=a[0], se_out=out)),
             block.se.conv1.conv.register_forward_pre_hook(lambda m, a: seen.update(pooled=a[0])),
             block.linear_conv.conv.register_forward_pre_hook(lambda m, a: seen.update(proj_in=a[0]))]
    x = images(2, seed=3, size=64)
    mmbrecq.calibrate_activations(model, [x], _forward)
    set_quant_state(model, False, False)
    try:
        with torch.no_grad():
            _forward(model, x)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(seen['proj_in'], seen['se_out'])
    assert torch.allclose(seen['pooled'], seen['se_in'].mean((2, 3), keepdim=True))
    # without expansion (EfficientNet's first block) the depthwise conv reads the block input
    eff = mmbrecq.quantize_model(build_float('efficientnet-b0'), FAST_QCFG)
    first = eff.backbone.layers[1][0]
    assert not first.with_expand_conv and not _has_in_q(first.depthwise_conv.conv)
    assert isinstance(first.input_quantizer, LSQQuantizer)


def test_convnext_placement_layernorm_stays_float():
    from mmpretrain.models.utils import LayerNorm2d
    model = mmbrecq.quantize_model(build_float('convnext-tiny'), FAST_QCFG)
    block = model.backbone.stages[2][4]
    assert isinstance(block.input_quantizer, LSQQuantizer)  # depthwise conv + residual read it
    assert not _has_in_q(block.depthwise_conv)
    assert isinstance(block.pointwise_conv1, QuantLayerMixin) and isinstance(block.pointwise_conv1, nn.Linear)
    assert _has_in_q(block.pointwise_conv1) and _has_in_q(block.pointwise_conv2)  # after LN, after GELU
    assert type(block.norm) is LayerNorm2d and isinstance(block.gamma, nn.Parameter)
    assert not any(isinstance(m, QuantLayerMixin) for m in block.norm.modules())


def test_depthwise_conv_folded_with_one_weight_range_per_channel():
    """BN folded into the depthwise ConvModule; min-max ranges: one per channel, i.e. per
    input channel of the depthwise conv (its ``k x k`` weights)."""
    float_model = build_float('mobilenet-v3-large')
    dw_float = float_model.backbone.layer7.depthwise_conv
    bn = dw_float.bn
    folded_w = dw_float.conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
    model = mmbrecq.quantize_model(float_model, FAST_QCFG)
    dw = model.backbone.layer7.depthwise_conv.conv
    assert dw.groups == dw.in_channels == dw.out_channels == 240 and dw.weight.shape == (240, 1, 3, 3)
    assert isinstance(model.backbone.layer7.depthwise_conv.bn, nn.Identity)
    torch.testing.assert_close(dw.weight.detach(), folded_w.detach())
    q = dw.weight_quantizer
    assert q.scale.shape == (240, ) and q.bits == 4
    lo = dw.weight.detach().flatten(1).amin(1).clamp(max=0)
    hi = dw.weight.detach().flatten(1).amax(1).clamp(min=0)
    torch.testing.assert_close(q.scale.detach(), (hi - lo) / (q.qmax - q.qmin))


def test_hard_swish_outputs_keep_negative_codes():
    """Hard-swish reaches -3/8: the asymmetric activation quantizers (Lp range search, the
    default, and min-max) give its negative part codes below the zero point. (Where the
    whole negative part is under half a step, e.g. 4 bits over [-0.375, 11], the nearest
    grid has no code below zero: rounding it to 0 is then the smaller error.)"""
    g = torch.Generator().manual_seed(0)
    for bits, spread in ((4, 1.0), (8, 3.0)):
        x = F.hardswish(torch.randn(4096, generator=g) * spread)
        assert x.min() < -0.3
        for init in ('lp', 'minmax'):
            q = LSQQuantizer(bits=bits, init=init)
            q.init_range(x)
            codes = q.integer_repr(x)
            assert q.zero_point.item() > q.qmin and (codes < q.zero_point).any(), (bits, init)
            xq = q(x).detach()
            assert xq.min() < 0, (bits, init)
            neg = x < 0
            assert (xq[neg] - x[neg]).abs().max() <= q.scale.item() / 2 + 1e-6, (bits, init)  # not clipped
    # in the model: the depthwise conv after an HSwish expand conv has negative inputs on its grid
    model = mmbrecq.quantize_model(build_float('mobilenet-v3-large'), FAST_QCFG)
    mmbrecq.calibrate_activations(model, [images(2, seed=3, size=64)], _forward)
    dwq = model.backbone.layer7.depthwise_conv.conv.input_quantizer  # reads HSwish(expand(x))
    assert dwq.zero_point.item() > 0


# ---------------------------------------------------------------------------------------
# Conv2dAdaptivePadding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [7, 8, 13])
@pytest.mark.parametrize('kernel,stride,groups', [(3, 2, 1), (5, 2, 4), (5, 1, 4), (1, 1, 1)])
def test_adaptive_padding_twin_keeps_the_padding(size, kernel, stride, groups):
    from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
    torch.manual_seed(0)
    conv = Conv2dAdaptivePadding(4, 8, kernel, stride=stride, padding=kernel // 2, groups=groups).eval()
    x = torch.randn(2, 4, size, size)
    with torch.no_grad():
        ref = conv(x)
    q = mmbrecq.quantize_model(nn.Sequential(conv), dict(FAST_QCFG, keep_8bit=[]))[0]
    assert type(q) is QuantConv2dAdaptivePadding and q.padding == (0, 0)
    mmbrecq.calibrate_activations(q, [x])
    with torch.no_grad():
        quant = q(x)
        set_quant_state(q, False, False)
        off = q(x)
    assert off.shape == quant.shape == ref.shape == (2, 8, -(-size // stride), -(-size // stride))
    assert torch.equal(off, ref)
    assert 0 < _rel_err(quant, ref) < 0.5
    plain = QuantConv2d.from_float(conv, q.weight_quantizer, None)  # what the generic twin would do
    if kernel > 1:
        assert plain(x).shape != ref.shape


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------
def test_onnx_export_matches_in_onnxruntime(family, tmp_path):
    """onnxruntime vs the fake-quant model: within one output step plus PyTorch's own noise
    floor (its oneDNN and plain conv backends disagree at rounding boundaries too, and a
    flipped 4-bit code moves everything downstream; see tests/test_export_onnx.py), for at
    least 3 of the 4 images. A sum that lands within an ulp of a rounding boundary in one
    runtime and not the other flips a code and moves every logit of that image (seen on
    ConvNeXt, whose two PyTorch backends agree to the bit, so the noise floor is 0); a wrong
    scale, zero point or clip in the export would move every image."""
    pytest.importorskip('onnxruntime')
    from mmbrecq.export import export_onnx, onnxruntime_session, qdq_node_counts
    model, x = family['model'], family['x']
    path = export_onnx(model, x[:1], str(tmp_path / f'{family["name"]}.onnx'))
    sess = onnxruntime_session(path, threads=1)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = _forward(model, x)
        torch.backends.mkldnn.enabled = False
        try:
            alt = _forward(model, x)
        finally:
            torch.backends.mkldnn.enabled = True
    last = [m for m in model.modules() if isinstance(m, QuantLayerMixin)][-1]
    step = (last.input_quantizer.scale * last.quantized_weight().abs().max()).item()
    noise = (alt - ref).abs()
    assert out.shape == ref.shape == (4, 1000)
    assert step < 0.01 * ref.abs().max()  # the tolerance is tight relative to the logits
    err = (out - ref).abs()
    close = (err.amax(1) <= step + 1.5 * noise.amax(1)) & (err.mean(1) <= step + 1.5 * noise.mean(1))
    assert int(close.sum()) >= 3, (err.amax(1), step, noise.amax(1))
    assert (out.argmax(1) == ref.argmax(1))[close].all()
    counts = qdq_node_counts(path)
    n_q = len([q for q in quantizers_of(model) if q.enabled])
    assert counts['QuantizeLinear'] == counts['DequantizeLinear'] >= n_q


def test_integer_and_baked_checkpoints(family, tmp_path):
    """The integer checkpoint rebuilds the same model (twins included) from a fresh float one;
    the baked float checkpoint loads strictly into the stock mmpretrain model and gives the
    weight-quantized model's output (BN re-inserted as identity statistics)."""
    from mmbrecq.export import bake_float_checkpoint, load_integer_checkpoint, save_integer_checkpoint
    model, x = family['model'], family['x'][:2]
    path = save_integer_checkpoint(model, FAST_QCFG, str(tmp_path / 'int.pth'))
    rebuilt = load_integer_checkpoint(build_float(family['name']), path)
    with torch.no_grad():
        assert torch.equal(_forward(rebuilt, x), _forward(model, x))
    baked = build_float(family['name'], seed=1)  # other weights: all must be overwritten
    state = bake_float_checkpoint(model, build_float(family['name']))
    baked.load_state_dict(state.get('state_dict', state), strict=True)
    set_quant_state(model, True, False)
    try:
        with torch.no_grad():
            ref = _forward(model, x)
            assert _rel_err(_forward(baked.eval(), x), ref) < 1e-5
    finally:
        set_quant_state(model, True, True)
