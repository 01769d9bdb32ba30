"""calibrate_activations: the stream the activation ranges are searched on."""
import copy

import pytest
import torch
from torch import nn

import mmbrecq
from mmbrecq.modules import quantizers_of
from mmbrecq.modules.quant_attention import QuantMatmulMixin
from mmbrecq.quantizers import LSQQuantizer

torch.set_num_threads(1)
QCFG = dict(w_bits=2, a_bits=2, keep_8bit=[], weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


def _model_and_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 1))
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return net, mmbrecq.quantize_model(copy.deepcopy(net), QCFG), x


@pytest.mark.parametrize('stream', ['float', 'quantized'])
def test_ranges_from_the_float_model_or_the_quantized_stream(stream):
    net, model, x = _model_and_batch()
    mmbrecq.calibrate_activations(model, [x], stream=stream)
    with torch.no_grad():
        float_input = net[3](net[2](net[1](net[0](x))))   # what the last conv reads in the float model
    expect = LSQQuantizer(bits=2, init='minmax')
    expect.init_range(float_input)
    got = model.get_submodule('4').input_quantizer
    same = torch.allclose(got.scale, expect.scale) and torch.equal(got.zero_point, expect.zero_point)
    assert same == (stream == 'float')  # 2-bit weights upstream change the quantized stream's range
    # the calibration leaves every quantizer as it found it: on, quantizing
    assert all(q.enabled and not q.observing for q in quantizers_of(model))
    with torch.no_grad():
        assert not torch.equal(model(x), net(x))


class _Attention(QuantMatmulMixin, nn.Module):
    def __init__(self):
        nn.Module.__init__(self)


class _WithAttention(nn.Module):
    """A CNN that also holds a quantized attention module (what 'auto' looks for)."""

    def __init__(self, cnn):
        super().__init__()
        self.cnn, self.attn = cnn, _Attention()

    def forward(self, x):
        return self.cnn(x)


@pytest.mark.parametrize('with_attention', [False, True])
def test_auto_is_float_for_cnns_and_quantized_for_transformers(with_attention):
    net, model, x = _model_and_batch()
    auto = _WithAttention(model) if with_attention else model
    mmbrecq.calibrate_activations(auto, [x])  # the default: 'auto'
    _, explicit, _ = _model_and_batch()
    mmbrecq.calibrate_activations(explicit, [x], stream='quantized' if with_attention else 'float')
    for a, b in zip(quantizers_of(model, 'act'), quantizers_of(explicit, 'act')):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_unknown_stream_names_the_key():
    _, model, x = _model_and_batch()
    with pytest.raises(ValueError, match='act_stream'):
        mmbrecq.calibrate_activations(model, [x], stream='fp')
