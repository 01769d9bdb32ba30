"""Post-LayerNorm scale reparameterisation: per-channel quantization, deployed per-tensor."""
import copy

import pytest
import torch
from torch import nn

from mmbrecq.modules import QuantLinear
from mmbrecq.modules.reparam import fold_post_ln_pair, fold_post_ln_scales, record_post_ln_pair
from mmbrecq.quantizers import ChannelReparamQuantizer, UniformQuantizer, fake_quant
from mmbrecq.registry import QUANTIZERS


def _ln_linear(seed=0, c=16, out=8):
    g = torch.Generator().manual_seed(seed)
    ln = nn.LayerNorm(c)
    with torch.no_grad():  # channels of very different scales and offsets, as in trained ViTs
        ln.weight.copy_(torch.logspace(-1, 1, c)[torch.randperm(c, generator=g)])
        ln.bias.copy_(torch.randn(c, generator=g))
    linear = nn.Linear(c, out)
    wq = UniformQuantizer(bits=8, num_channels=out, init='minmax')
    wq.init_range(linear.weight)
    wq.enabled = False  # float weights: the fold itself is under test
    return ln, QuantLinear.from_float(linear, wq, ChannelReparamQuantizer(bits=4, init='minmax'))


def _x(seed=1, c=16):
    return torch.randn(6, 5, c, generator=torch.Generator().manual_seed(seed)) * 3


def _calibrate(q, x):
    q.observing = True
    q(x)
    q.observing = False


def test_registered_and_per_channel_until_folded():
    assert QUANTIZERS.get('ChannelReparamQuantizer') is ChannelReparamQuantizer
    ln, linear = _ln_linear()
    y = ln(_x()).detach()
    q = linear.input_quantizer
    _calibrate(q, y)
    assert q.pending_fold and q.scale.shape == ()
    scale, zp = q.channel_qparams
    assert scale.shape == zp.shape == (16, ) and scale.max() / scale.min() > 5
    torch.testing.assert_close(q(y), fake_quant(y, scale, zp, q.qmin, q.qmax))


def test_fold_keeps_every_code_and_the_output():
    ln, linear = _ln_linear()
    x = _x()
    q = linear.input_quantizer
    with torch.no_grad():
        _calibrate(q, ln(x))
        per_channel = linear(ln(x))            # per-channel quantized input, float weights
        scale, zp = q.channel_qparams
        pc_codes = torch.clamp(torch.round(ln(x) / scale) + zp, q.qmin, q.qmax)
        float_out = nn.functional.linear(ln(x), linear.weight, linear.bias)
        fold_post_ln_pair(ln, linear, 'ln -> linear')
        assert q.folded and not q.pending_fold and q.scale.shape == ()
        assert float(q.zero_point) == float(q.zero_point.round())
        # the new LayerNorm output on the per-tensor grid: exactly the per-channel codes
        assert torch.equal(q.integer_repr(ln(x)), pc_codes)
        torch.testing.assert_close(linear(ln(x)), per_channel, atol=1e-5, rtol=1e-5)
        # and in float, the same function
        torch.testing.assert_close(nn.functional.linear(ln(x), linear.weight, linear.bias), float_out,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match='already folded'):
        q.fold_to_per_tensor()


def test_per_channel_beats_per_tensor_at_4_bits():
    ln, linear = _ln_linear()
    y = ln(_x()).detach()
    pc = linear.input_quantizer
    _calibrate(pc, y)
    pt = UniformQuantizer(bits=4, init='minmax')
    pt.init_range(y)
    with torch.no_grad():
        assert (pc(y) - y).pow(2).sum() < 0.5 * (pt(y) - y).pow(2).sum()


def test_fold_by_recorded_pairs_and_state_dict():
    ln, linear = _ln_linear()
    block = nn.Sequential()
    block.add_module('norm', ln)
    block.add_module('fc', linear)
    record_post_ln_pair(block, 'norm', 'fc')
    record_post_ln_pair(block, 'norm', 'fc')  # once
    assert fold_post_ln_scales(block) == 0  # nothing calibrated yet
    with torch.no_grad():
        _calibrate(linear.input_quantizer, ln(_x()))
    assert fold_post_ln_scales(copy.deepcopy(block)) == 1  # recorded pairs survive a deep copy
    assert fold_post_ln_scales(block) == 1 and fold_post_ln_scales(block) == 0
    fresh = ChannelReparamQuantizer(bits=4)
    fresh.load_state_dict(linear.input_quantizer.state_dict())
    assert fresh.folded and fresh.initialized and not fresh.pending_fold


def test_layernorm_without_affine_is_an_error():
    ln, linear = _ln_linear()
    with torch.no_grad():
        _calibrate(linear.input_quantizer, ln(_x()))
    with pytest.raises(ValueError, match='no affine'):
        fold_post_ln_pair(nn.LayerNorm(16, elementwise_affine=False), linear, 'blocks.0.ln1 -> blocks.0.fc')


@pytest.mark.parametrize('when', ['before calibration', 'after calibration'])
def test_shift_free_grid_shares_one_zero_point_and_keeps_every_range(when):
    """``set_shift_free``: one zero point for every channel (so the fold has no shift), each
    channel's calibrated range still inside its grid."""
    ln, linear = _ln_linear()
    y = ln(_x()).detach()
    q = linear.input_quantizer
    ref = copy.deepcopy(q)
    _calibrate(ref, y)
    if when == 'before calibration':
        q.set_shift_free()
        _calibrate(q, y)
    else:
        _calibrate(q, y)
        q.set_shift_free()
    scale, zp = q.channel_qparams
    ref_scale, ref_zp = ref.channel_qparams
    assert len(set(zp.tolist())) == 1 and len(set(ref_zp.tolist())) > 1
    lo, hi = (q.qmin - zp) * scale, (q.qmax - zp) * scale
    if when == 'before calibration':  # the calibrated (min-max) range of every channel
        want_lo, want_hi = y.amin((0, 1)).clamp_max(0), y.amax((0, 1)).clamp_min(0)
    else:  # redrawn around the per-channel grid calibration had drawn
        want_lo, want_hi = (q.qmin - ref_zp) * ref_scale, (q.qmax - ref_zp) * ref_scale
    assert (lo <= want_lo + 1e-5).all() and (hi >= want_hi - 1e-5).all()
    assert (scale >= ref_scale * (1 - 1e-6)).all()  # a shared zero point only widens steps
    assert (scale.max() / scale.min()) > 5  # still per channel
    r, b = q.fold_to_per_tensor()
    assert torch.equal(b, torch.zeros_like(b)) and float(q.zero_point) == float(zp[0])
    with pytest.raises(RuntimeError, match='already folded'):
        q.set_shift_free()
