"""QuantConv2d / QuantLinear: still the float layer, plus input and weight fake quantization."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mmbrecq.modules import QuantConv2d, QuantLayerMixin, QuantLinear, quant_twin, set_quant_state
from mmbrecq.quantizers import AdaRoundQuantizer, LSQQuantizer, UniformQuantizer

torch.set_num_threads(1)  # 2-core CI: multithreaded CPU convs are much slower here

CONV_CASES = {
    'plain': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    'no_bias': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=False),
    'grouped': dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    'depthwise': dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6,
                      bias=False),
    'stride_dilation': dict(in_channels=4, out_channels=5, kernel_size=3, stride=2, padding=2,
                            dilation=2),
    'rect_kernel': dict(in_channels=4, out_channels=5, kernel_size=(1, 3), stride=(2, 1),
                        padding=(0, 1)),
    'reflect': dict(in_channels=4, out_channels=5, kernel_size=3, padding=1,
                    padding_mode='reflect'),
    'circular': dict(in_channels=4, out_channels=5, kernel_size=3, padding=2, dilation=2,
                     padding_mode='circular'),
    'replicate_same': dict(in_channels=4, out_channels=5, kernel_size=3, padding='same',
                           padding_mode='replicate'),
}


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _make_conv(kwargs, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**kwargs).eval()
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.normal_()
    return conv


def _quantizers(weight, x, w_bits=4, a_bits=4, weight_cls=UniformQuantizer):
    kwargs = dict(bits=w_bits, num_channels=weight.shape[0], ch_axis=0, init='minmax')
    if weight_cls is AdaRoundQuantizer:
        kwargs['weight_shape'] = tuple(weight.shape)
    wq = weight_cls(**kwargs)
    wq.init_range(weight)
    iq = LSQQuantizer(bits=a_bits, init='minmax')
    iq.init_range(x)
    return wq, iq


def _ref_conv(conv, x, weight):
    """Functional reference of ``conv`` with another weight (handles non-zero padding modes)."""
    if conv.padding_mode != 'zeros':
        pad = conv._reversed_padding_repeated_twice
        return F.conv2d(F.pad(x, pad, mode=conv.padding_mode), weight, conv.bias, conv.stride,
                        (0, 0), conv.dilation, conv.groups)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.fixture(params=sorted(CONV_CASES), ids=sorted(CONV_CASES))
def conv_case(request):
    kwargs = CONV_CASES[request.param]
    conv = _make_conv(kwargs)
    x = torch.randn(2, kwargs['in_channels'], 9, 10, generator=_seeded(1))
    with torch.no_grad():
        ref = conv(x)
    weight_before = conv.weight
    wq, iq = _quantizers(conv.weight, x)
    q = QuantConv2d.from_float(conv, wq, iq)
    return conv, q, x, ref, weight_before


# ---------------------------------------------------------------------------------------
# QuantConv2d
# ---------------------------------------------------------------------------------------
def test_conv_keeps_interface_and_the_float_parameters(conv_case):
    conv, q, _, _, weight_before = conv_case
    assert isinstance(q, nn.Conv2d) and isinstance(q, QuantLayerMixin) and type(q) is QuantConv2d
    for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation',
                 'groups', 'padding_mode', 'transposed', 'output_padding'):
        assert getattr(q, attr) == getattr(conv, attr), attr
    # the very same Parameter objects: reconstruction and optimisers see the float weight
    assert q.weight is weight_before and q.weight is conv.weight
    assert q.bias is conv.bias
    assert (q.bias is None) == (conv.bias is None)
    assert q.weight_quantizer is not None and q.input_quantizer is not None
    # the quantizers are registered children, so they travel in state_dict / .to()
    keys = set(q.state_dict())
    assert {'weight', 'weight_quantizer.scale', 'weight_quantizer.zero_point',
            'input_quantizer.scale', 'input_quantizer.zero_point'} <= keys
    assert ('bias' in keys) == (conv.bias is not None)


def test_conv_disabled_quantization_matches_float_layer_exactly(conv_case):
    conv, q, x, ref, _ = conv_case
    set_quant_state(q, weight=False, act=False)
    with torch.no_grad():
        out = q(x)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_conv_quantized_forward_is_conv_of_quantized_input_and_weight(conv_case):
    conv, q, x, ref, _ = conv_case
    set_quant_state(q, True, True)
    with torch.no_grad():
        out = q(x)
        xq, wq = q.input_quantizer(x), q.weight_quantizer(q.weight)
        expected = _ref_conv(q, xq, wq)
    # fake quantization actually happened (4 bits): input and weight changed
    assert not torch.equal(xq, x) and not torch.equal(wq, q.weight)
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(q.quantized_weight(), wq)


def test_conv_set_quant_state_toggles_each_quantizer(conv_case):
    conv, q, x, ref, _ = conv_case
    with torch.no_grad():
        xq, wq = q.input_quantizer(x), q.weight_quantizer(q.weight)
        set_quant_state(q, weight=True, act=False)
        assert q.weight_quantizer.enabled and not q.input_quantizer.enabled
        torch.testing.assert_close(q(x), _ref_conv(q, x, wq), rtol=0, atol=1e-6)
        set_quant_state(q, weight=False, act=True)
        assert not q.weight_quantizer.enabled and q.input_quantizer.enabled
        torch.testing.assert_close(q(x), _ref_conv(q, xq, q.weight), rtol=0, atol=1e-6)
        set_quant_state(q, weight=False, act=False)
        assert torch.equal(q(x), ref)
        set_quant_state(q, )  # defaults: both on
        assert q.weight_quantizer.enabled and q.input_quantizer.enabled
        torch.testing.assert_close(q(x), _ref_conv(q, xq, wq), rtol=0, atol=1e-6)


def test_conv_without_input_quantizer_reads_the_raw_input():
    conv = _make_conv(CONV_CASES['grouped'])
    x = torch.randn(2, 4, 8, 8, generator=_seeded(2))
    wq, _ = _quantizers(conv.weight, x)
    q = QuantConv2d.from_float(conv, wq, None)
    assert q.input_quantizer is None
    set_quant_state(q, weight=True, act=True)  # no input quantizer: must not fail
    with torch.no_grad():
        torch.testing.assert_close(q(x), _ref_conv(q, x, wq(q.weight)), rtol=0, atol=1e-6)
        set_quant_state(q, weight=False, act=False)
        assert torch.equal(q(x), conv._conv_forward(x, conv.weight, conv.bias))


def test_conv_gradients_reach_the_float_weight_and_adaround_alpha():
    conv = _make_conv(CONV_CASES['depthwise'])
    x = torch.randn(2, 6, 8, 8, generator=_seeded(3))
    wq, iq = _quantizers(conv.weight, x, weight_cls=AdaRoundQuantizer)
    q = QuantConv2d.from_float(conv, wq, iq)
    q.weight_quantizer.set_rounding('soft', q.weight)
    q(x).square().sum().backward()
    assert q.weight_quantizer.alpha.grad is not None
    assert q.weight_quantizer.alpha.grad.abs().sum() > 0
    assert q.input_quantizer.scale.grad is not None


def test_conv_from_float_keeps_dtype():
    conv = nn.Conv2d(3, 4, 3).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=_seeded(4))
    wq, iq = _quantizers(conv.weight, x)
    q = QuantConv2d.from_float(conv, wq.double(), iq.double())
    assert q.weight.dtype == torch.float64 and q.weight is conv.weight
    set_quant_state(q, False, False)
    assert torch.equal(q(x), conv(x))


# ---------------------------------------------------------------------------------------
# QuantLinear
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('shape', [(4, 7), (2, 3, 7)])
def test_linear_interface_and_numerics(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(7, 5, bias=bias).eval()
    x = torch.randn(*shape, generator=_seeded(5))
    with torch.no_grad():
        ref = lin(x)
    weight_before = lin.weight
    wq, iq = _quantizers(lin.weight, x, w_bits=3, a_bits=3)
    q = QuantLinear.from_float(lin, wq, iq)

    assert isinstance(q, nn.Linear) and type(q) is QuantLinear
    assert (q.in_features, q.out_features) == (7, 5)
    assert q.weight is weight_before and q.bias is lin.bias
    with torch.no_grad():
        set_quant_state(q, False, False)
        assert torch.equal(q(x), ref)
        set_quant_state(q, True, True)
        out = q(x)
        xq, w_q = q.input_quantizer(x), q.weight_quantizer(q.weight)
        assert not torch.equal(xq, x) and not torch.equal(w_q, q.weight)
        torch.testing.assert_close(out, F.linear(xq, w_q, q.bias), rtol=0, atol=1e-6)
        assert not torch.allclose(out, ref)
        set_quant_state(q, weight=True, act=False)
        torch.testing.assert_close(q(x), F.linear(x, w_q, q.bias), rtol=0, atol=1e-6)
        set_quant_state(q, weight=False, act=True)
        torch.testing.assert_close(q(x), F.linear(xq, q.weight, q.bias), rtol=0, atol=1e-6)


def test_linear_without_input_quantizer():
    lin = nn.Linear(6, 3).eval()
    x = torch.randn(4, 6, generator=_seeded(6))
    wq, _ = _quantizers(lin.weight, x)
    q = QuantLinear.from_float(lin, wq, None)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.linear(x, wq(lin.weight), lin.bias), rtol=0, atol=1e-6)


def test_enabled_quantizer_without_range_raises():
    """An uncalibrated input quantizer must not silently pass the float input through."""
    conv = _make_conv(CONV_CASES['plain'])
    wq = UniformQuantizer(bits=4, num_channels=6, init='minmax')
    wq.init_range(conv.weight)
    q = QuantConv2d.from_float(conv, wq, LSQQuantizer(bits=4))
    with pytest.raises(RuntimeError, match='calibrate'):
        q(torch.randn(1, 4, 6, 6))
    set_quant_state(q, weight=True, act=False)
    q(torch.randn(1, 4, 6, 6))


# ---------------------------------------------------------------------------------------
# quant_twin
# ---------------------------------------------------------------------------------------
def test_quant_twin_maps_float_layers_and_subclasses_only():
    from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
    from mmcv.cnn.bricks.wrappers import Linear as MMCVLinear
    assert quant_twin(nn.Conv2d(3, 4, 1)) is QuantConv2d
    assert quant_twin(MMCVConv2d(3, 4, 1)) is QuantConv2d
    assert quant_twin(nn.Linear(3, 4)) is QuantLinear
    assert quant_twin(MMCVLinear(3, 4)) is QuantLinear
    for m in (nn.BatchNorm2d(3), nn.ReLU(), nn.Conv1d(3, 4, 1), nn.ConvTranspose2d(3, 4, 2),
              nn.Sequential(nn.Conv2d(3, 4, 1))):
        assert quant_twin(m) is None, m
    # an already quantized layer is not swapped twice
    conv = nn.Conv2d(3, 4, 1)
    wq = UniformQuantizer(bits=4, num_channels=4)
    assert quant_twin(QuantConv2d.from_float(conv, wq, None)) is None
    lin = nn.Linear(3, 4)
    assert quant_twin(QuantLinear.from_float(lin, UniformQuantizer(bits=4, num_channels=4), None)) is None


# ---------------------------------------------------------------------------------------
# sampled step gradient of the input quantizer (sample_input_step_grad)
# ---------------------------------------------------------------------------------------
def _sampling_case(kind, stride, seed=0):
    torch.manual_seed(seed)
    if kind == 'linear':
        layer, x = nn.Linear(7, 5), torch.randn(8, 3, 7, generator=_seeded(11))
        twin = QuantLinear
    else:
        layer, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(8, 3, 6, 6, generator=_seeded(11))
        twin = QuantConv2d
    wq, iq = _quantizers(layer.weight, x, w_bits=3, a_bits=3, weight_cls=AdaRoundQuantizer)
    q = twin.from_float(layer, wq, iq)
    wq.set_rounding('soft', q.weight)
    for p in q.parameters():
        p.requires_grad_(False)
    wq.alpha.requires_grad_(True)
    iq.scale.requires_grad_(True)
    q.sample_input_step_grad(stride)
    return q, x


def _grads(q, x, out_weight):
    q.weight_quantizer.alpha.grad = q.input_quantizer.scale.grad = None
    out = q(x)
    (out * out_weight).sum().backward()
    return out.detach(), q.weight_quantizer.alpha.grad.clone(), q.input_quantizer.scale.grad.clone()


@pytest.mark.parametrize('kind', ['linear', 'conv'])
def test_sampled_step_grad_keeps_output_and_weight_gradient_exact(kind):
    q, x = _sampling_case(kind, 1)
    out_weight = torch.randn(q(x).shape, generator=_seeded(12))
    out, g_alpha, g_step = _grads(q, x, out_weight)
    q.sample_input_step_grad(4)
    out4, g_alpha4, g_step4 = _grads(q, x, out_weight)
    assert torch.equal(out4, out)
    torch.testing.assert_close(g_alpha4, g_alpha, rtol=1e-6, atol=1e-7)
    assert not torch.equal(g_step4, g_step)  # an estimate, from 2 of the 8 samples

    # the estimate is exactly stride x the step gradient of the sampled rows alone: every 4th
    # token over the batch for a Linear (8 x 3 tokens), samples 0 and 4 for a convolution
    q.sample_input_step_grad(1)
    with torch.no_grad():
        keep = torch.zeros_like(out_weight)
        rows = keep.view(-1, keep.shape[-1]) if kind == 'linear' else keep
        rows[::4] = 4 * (out_weight.view(-1, keep.shape[-1]) if kind == 'linear' else out_weight)[::4]
    _, _, g_sub = _grads(q, x, keep)
    torch.testing.assert_close(g_step4, g_sub, rtol=1e-5, atol=1e-7)


def test_sampled_step_grad_is_unbiased_over_the_samples():
    """Averaged over the ``stride`` row offsets (what random batches average over), the
    estimate is the full gradient."""
    q, x = _sampling_case('linear', 1)
    x = x.reshape(-1, 1, x.shape[-1])  # one token per sample: rows and samples coincide
    out_weight = torch.randn(q(x).shape, generator=_seeded(13))
    _, _, g_full = _grads(q, x, out_weight)
    q.sample_input_step_grad(4)
    estimates = [_grads(q, x.roll(-k, 0), out_weight.roll(-k, 0))[2] for k in range(4)]
    torch.testing.assert_close(torch.stack(estimates).mean(0), g_full, rtol=1e-5, atol=1e-7)


def test_sampled_step_grad_applies_only_when_the_input_needs_no_gradient():
    q, x = _sampling_case('linear', 4)
    out_weight = torch.randn(q(x).shape, generator=_seeded(14))
    _, _, g_sampled = _grads(q, x, out_weight)
    q.sample_input_step_grad(1)
    _, _, g_full = _grads(q, x, out_weight)
    q.sample_input_step_grad(4)
    x_grad = x.clone().requires_grad_(True)  # an inner layer: the exact data gradient is needed anyway
    _, _, g = _grads(q, x_grad, out_weight)
    torch.testing.assert_close(g, g_full, rtol=1e-6, atol=1e-7)
    assert x_grad.grad is not None and not torch.equal(g_sampled, g_full)
    # a Linear counts tokens: 2 samples of 12 tokens are 24 rows to sample from
    few = torch.randn(2, 12, 7, generator=_seeded(15))
    few_weight = torch.randn(2, 12, 5, generator=_seeded(16))
    _, _, g4 = _grads(q, few, few_weight)
    q.sample_input_step_grad(1)
    _, _, g1 = _grads(q, few, few_weight)
    assert not torch.equal(g4, g1)
    q.input_quantizer.fix_step()  # a fixed step: nothing to sample, the layer runs as usual
    assert not q.input_quantizer.step_grad_samplable
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(q.input_quantizer(x), q.quantized_weight(), q.bias))


def test_sampled_step_grad_is_off_under_a_qdrop_draw_or_a_stream_mask():
    q, x = _sampling_case('linear', 4)
    iq = q.input_quantizer
    assert iq.step_grad_samplable
    iq.train()
    iq.set_qdrop(0.5)
    assert not iq.step_grad_samplable
    iq.set_qdrop(None)
    iq.set_stream_mask(torch.ones_like(x, dtype=torch.bool))
    assert not iq.step_grad_samplable
    with pytest.raises(RuntimeError, match='cannot be sampled'):
        iq.quantize_sample(x[::4], x)
    # a subclass with its own grid (twin uniform, the reparameterised post-LN quantizer): not sampled
    from mmbrecq.quantizers import TwinUniformQuantizer
    twin = TwinUniformQuantizer(bits=4, init='minmax')
    twin.init_range(x)
    assert twin.scale.requires_grad and not twin.step_grad_samplable


@pytest.mark.parametrize('stride', [0, -1, 1.5, True])
def test_sample_input_step_grad_rejects_a_bad_stride(stride):
    q, _ = _sampling_case('linear', 1)
    with pytest.raises(ValueError, match='QuantLinear: the step-gradient stride'):
        q.sample_input_step_grad(stride)
