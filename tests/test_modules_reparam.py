"""Folding post-LayerNorm per-channel scales into the LayerNorm and the next Linear: pairs that
must fold without a shift (a bias-free Linear, a pair recorded ``shift=False``) keep the float
model's parameters, and calibration draws their shift-free grids up front."""
import copy

import pytest
import torch
from torch import nn

import mmbrecq
from mmbrecq.export import bake_float_checkpoint
from mmbrecq.modules import QuantLinear, set_quant_state
from mmbrecq.modules.reparam import fold_post_ln_scales, plan_post_ln_folds, record_post_ln_pair
from mmbrecq.quantizers import ChannelReparamQuantizer, UniformQuantizer

torch.set_num_threads(1)  # 2-core CI


class _Block(nn.Module):
    def __init__(self, bias, seed=0, c=16, out=8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, out, bias=bias)
        with torch.no_grad():  # channels of very different scales and offsets, as in trained ViTs
            self.norm.weight.copy_(torch.logspace(-1, 1, c)[torch.randperm(c, generator=g)])
            self.norm.bias.copy_(torch.randn(c, generator=g))
            self.fc.weight.copy_(torch.randn(out, c, generator=g) * 0.3)

    def forward(self, x):
        return self.fc(self.norm(x))


def _quantized(block, shift=True):
    q = copy.deepcopy(block)
    wq = UniformQuantizer(bits=8, num_channels=q.fc.out_features, init='minmax')
    wq.init_range(q.fc.weight)
    wq.enabled = False  # float weights: the fold itself is under test
    q.fc = QuantLinear.from_float(q.fc, wq, ChannelReparamQuantizer(bits=4, init='minmax'))
    record_post_ln_pair(q, 'norm', 'fc', shift=shift)
    return q


def _x(seed=1):
    return torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(seed)) * 3


def _per_channel_codes(q, y):
    scale, zp = q.channel_qparams
    return torch.clamp(torch.round(y / scale) + zp, q.qmin, q.qmax)


@pytest.mark.parametrize('bias, shift', [(False, True), (True, False)])
def test_fold_without_shift_adds_no_parameter(bias, shift):
    block = _Block(bias)
    model = _quantized(block, shift)
    x = _x()
    assert plan_post_ln_folds(model) == 1
    q = model.fc.input_quantizer
    with torch.no_grad():
        q.start_observing(None)
        model(x)
        q.stop_observing()
        codes = _per_channel_codes(q, model.norm(x))
        per_channel = model(x)
        assert fold_post_ln_scales(model) == 1
    assert q.folded and q.shift_free
    # the float model's parameter set: no bias appears, a bias stays the float one
    params = [k for k, _ in model.named_parameters() if 'quantizer' not in k]
    assert params == [k for k, _ in block.named_parameters()]
    if bias:
        assert torch.equal(model.fc.bias, block.fc.bias)
    with torch.no_grad():
        # every element keeps its (shift-free) per-channel code, the quantized output its value
        assert torch.equal(q.integer_repr(model.norm(x)), codes)
        model.fc.weight_quantizer.enabled = False
        torch.testing.assert_close(model(x), per_channel, atol=1e-5, rtol=1e-5)
        set_quant_state(model, False, False)  # quantization off: the float function
        torch.testing.assert_close(model(x), block(x), atol=1e-5, rtol=1e-5)
    # the baked float checkpoint fits the float architecture
    block_copy = copy.deepcopy(block)
    block_copy.load_state_dict(bake_float_checkpoint(model, block), strict=True)


def test_bias_free_linear_folded_without_plan_is_redrawn_at_the_fold():
    """Calibrated without :func:`plan_post_ln_folds`: the fold redraws the grid shift-free."""
    block = _Block(bias=False)
    model = _quantized(block)
    q = model.fc.input_quantizer
    with torch.no_grad():
        q.start_observing(None)
        model(_x())
        q.stop_observing()
    assert len(set(q.channel_qparams[1].tolist())) > 1  # an ordinary per-channel grid
    assert fold_post_ln_scales(model) == 1
    assert model.fc.bias is None and q.shift_free and q.folded


def test_shifted_fold_keeps_its_bias_shift():
    """The default pair (Linear with a bias) still folds the shift: per-channel zero points."""
    block = _Block(bias=True)
    model = _quantized(block)
    assert plan_post_ln_folds(model) == 0
    mmbrecq.calibrate_activations(model, [_x()])
    q = model.fc.input_quantizer
    assert q.folded and not q.shift_free
    assert not torch.equal(model.fc.bias, block.fc.bias)
    set_quant_state(model, False, False)
    with torch.no_grad():
        torch.testing.assert_close(model(_x(2)), block(_x(2)), atol=1e-5, rtol=1e-5)
