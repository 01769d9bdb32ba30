"""Quantized attention twins: float result when quantization is off, every matmul operand quantized."""
import copy

import pytest
import torch

from mmbrecq.modules.quant_attention import MATMUL_QUANTIZERS, QuantMultiheadAttention, QuantWindowMSA, attention_twin
from mmbrecq.quantizers import Log2Quantizer, LSQQuantizer

attention = pytest.importorskip('mmpretrain.models.utils.attention')


def _quantizers(bits=4):
    return [LSQQuantizer(bits=bits, init='minmax'), LSQQuantizer(bits=bits, init='minmax'),
            Log2Quantizer(bits=bits), LSQQuantizer(bits=bits, init='minmax')]


def _calibrate(module, *args, **kwargs):
    for q in module.matmul_quantizers():
        q.observing = True
    with torch.no_grad():
        module(*args, **kwargs)
    for q in module.matmul_quantizers():
        q.observing = False


def _mha(seed=0, **kw):
    torch.manual_seed(seed)
    return attention.MultiheadAttention(embed_dims=32, num_heads=4, **kw).eval()


def _window_msa(seed=0):
    torch.manual_seed(seed)
    m = attention.WindowMSA(embed_dims=32, window_size=(4, 4), num_heads=2).eval()
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0, 0.5)  # a non-zero bias: it must be applied
    return m


def _tokens(b, n, c, seed=1):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


def test_twin_lookup():
    assert attention_twin(_mha()) is QuantMultiheadAttention
    assert attention_twin(_window_msa()) is QuantWindowMSA
    assert attention_twin(torch.nn.Linear(2, 2)) is None
    twin = QuantMultiheadAttention.from_float(_mha())
    assert attention_twin(twin) is None  # a twin is not swapped again


def test_twin_shares_parameters_and_names():
    float_attn = _mha()
    twin = QuantMultiheadAttention.from_float(float_attn)
    twin.attach_matmul_quantizers(_quantizers())
    assert isinstance(twin, attention.MultiheadAttention)
    assert twin.qkv.weight is float_attn.qkv.weight
    float_keys = set(float_attn.state_dict())
    assert float_keys <= set(twin.state_dict())
    assert not any(k.startswith(MATMUL_QUANTIZERS) for k in float_keys)  # the float module is untouched
    assert set(dict(twin.named_children())) - set(dict(float_attn.named_children())) == set(MATMUL_QUANTIZERS)


@pytest.mark.parametrize('qk_scale', [None, 0.3])
def test_mha_quant_off_is_the_float_module_and_eager_matches_sdpa(qk_scale):
    float_attn = _mha(qk_scale=qk_scale)
    x = _tokens(3, 17, 32)
    with torch.no_grad():
        ref = float_attn(x)
        twin = QuantMultiheadAttention.from_float(copy.deepcopy(float_attn))
        twin.attach_matmul_quantizers(_quantizers())
        _calibrate(twin, x)
        for q in twin.matmul_quantizers():
            q.enabled = False
        # quantization off: the float module's own scaled_dot_product_attention call, bit for bit
        assert torch.equal(twin(x), ref)
        # the eager formula the quantized path uses: PyTorch's fused kernel to float rounding
        torch.testing.assert_close(twin(x, force_eager=True), ref, atol=1e-6, rtol=1e-5)


def test_mha_operands_quantized():
    float_attn = _mha()
    x = _tokens(3, 17, 32)
    twin = QuantMultiheadAttention.from_float(copy.deepcopy(float_attn))
    twin.attach_matmul_quantizers(_quantizers(bits=4))
    _calibrate(twin, x)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = args[0].shape
        return hook

    hooks = [getattr(twin, n).register_forward_hook(record(n)) for n in MATMUL_QUANTIZERS]
    with torch.no_grad():
        out = twin(x)
    for h in hooks:
        h.remove()
    head = (3, 4, 17, 8)
    assert seen == dict(q_quantizer=head, k_quantizer=head, attn_quantizer=(3, 4, 17, 17), v_quantizer=head)
    with torch.no_grad():
        ref = float_attn(x)
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.5  # quantized, still the same function
    # each operand's quantizer alone changes the output: none is bypassed
    for name in MATMUL_QUANTIZERS:
        for n in MATMUL_QUANTIZERS:
            getattr(twin, n).enabled = n == name
        with torch.no_grad():
            assert not torch.allclose(twin(x), ref, atol=1e-6), name


@pytest.mark.parametrize('with_mask', [False, True])
def test_window_msa_quant_off_exact_with_bias_and_mask(with_mask):
    float_attn = _window_msa()
    x = _tokens(8, 16, 32)
    mask = None
    if with_mask:  # two windows per image, as ShiftWindowMSA's shifted-window mask (0 / -100)
        mask = torch.zeros(2, 16, 16)
        mask[1, :8, 8:] = -100.0
        mask[1, 8:, :8] = -100.0
    with torch.no_grad():
        ref = float_attn(x, mask=mask)
        twin = QuantWindowMSA.from_float(copy.deepcopy(float_attn))
        twin.attach_matmul_quantizers(_quantizers())
        _calibrate(twin, x, mask=mask)
        for q in twin.matmul_quantizers():
            q.enabled = False
        assert torch.equal(twin(x, mask=mask), ref)
        for q in twin.matmul_quantizers():
            q.enabled = True
        out = twin(x, mask=mask)
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.5


def test_window_msa_twin_without_quantizers_is_float():
    float_attn = _window_msa()
    x = _tokens(2, 16, 32)
    twin = QuantWindowMSA.from_float(copy.deepcopy(float_attn))  # a_bits float: no quantizers attached
    with torch.no_grad():
        assert torch.equal(twin(x), float_attn(x))


def test_wrong_number_of_quantizers_is_an_error():
    twin = QuantMultiheadAttention.from_float(_mha())
    with pytest.raises(ValueError, match='needs 4 quantizers'):
        twin.attach_matmul_quantizers(_quantizers()[:3])


def test_twin_moves_like_a_module():
    """``.to()`` / ``.double()`` reach the quantizers (nn.Module._apply is not shadowed)."""
    twin = QuantMultiheadAttention.from_float(_mha())
    twin.attach_matmul_quantizers(_quantizers())
    twin.double()
    assert twin.qkv.weight.dtype == twin.q_quantizer.scale.dtype == torch.float64
