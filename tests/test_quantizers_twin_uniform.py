"""Twin-uniform quantizer of post-GELU values (PTQ4ViT)."""
import math

import pytest
import torch

from mmbrecq.quantizers import LSQQuantizer, TwinUniformQuantizer
from mmbrecq.quantizers.range_search import LocalReducer
from mmbrecq.registry import QUANTIZERS


def _gelu(seed=0, shape=(8, 33, 48), spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.gelu(torch.randn(shape, generator=g) * spread)


def _quantizer(bits=4, pos=0.5, neg=0.02, **kwargs):
    q = TwinUniformQuantizer(bits=bits, **kwargs)
    q.load_twin_qparams(torch.tensor(pos), torch.tensor(neg))
    return q


def test_registered_and_built_from_the_transformer_key():
    from mmbrecq import quantize_model
    assert QUANTIZERS.get('TwinUniformQuantizer') is TwinUniformQuantizer
    q = QUANTIZERS.build(dict(type='TwinUniformQuantizer', bits=4, role='act', init='lp', p=2.4))
    assert (q.qmin, q.qmax) == (-8, 7) and q.role == 'act'
    vit = _tiny_vit()
    qmodel = quantize_model(vit, dict(w_bits=4, a_bits=4, keep_8bit=[],
                                      transformer=dict(post_gelu=dict(type='TwinUniformQuantizer'))))
    twins = [n for n, m in qmodel.named_modules() if isinstance(m, TwinUniformQuantizer)]
    assert twins == [f'layers.{i}.ffn.layers.1.input_quantizer' for i in range(2)]  # the MLP's second Linear


def _tiny_vit():
    from mmpretrain.models import VisionTransformer
    vit = VisionTransformer(arch=dict(embed_dims=16, num_layers=2, num_heads=2, feedforward_channels=32),
                            img_size=8, patch_size=4)
    vit.eval()
    return vit


@pytest.mark.parametrize('bits', [2, 4, 6])
def test_grid_values_and_codes(bits):
    """Codes ``-2^(b-1) .. -1`` on the negative step, ``0 .. 2^(b-1)-1`` on the positive one."""
    q = _quantizer(bits, pos=0.5, neg=0.125)
    half = 1 << (bits - 1)
    levels = [c * 0.125 for c in range(-half, 0)] + [c * 0.5 for c in range(half)]
    x = torch.tensor(levels)
    assert torch.equal(q(x), x)                       # every level is on the grid
    assert torch.equal(q.integer_repr(x), torch.arange(-half, half, dtype=x.dtype))
    assert torch.equal(q.dequantize(q.integer_repr(x)), x)
    dense = torch.linspace(-1.5 * half * 0.125, 1.5 * half * 0.5, 20001)
    assert len(torch.unique(q(dense))) == 2**bits    # b bits: 2^b distinct values
    # rounding within each range, clamping at each end; the sign picks the step
    x = torch.tensor([-0.07, -0.05, -100.0, 0.3, 0.2, 100.0, 0.0])
    want = torch.tensor([-0.125, 0.0, -half * 0.125, 0.5, 0.0, (half - 1) * 0.5, 0.0])
    torch.testing.assert_close(q(x), want)
    assert q.integer_repr(x).min() >= q.qmin and q.integer_repr(x).max() <= q.qmax


def test_range_init_from_calibration_data():
    x = _gelu()
    q = TwinUniformQuantizer(bits=4, init='minmax')
    q.init_range(x)
    assert math.isclose(float(q.scale), float(x.max()) / 7, rel_tol=1e-6)
    assert math.isclose(float(q.neg_scale), float(-x.min()) / 8, rel_tol=1e-6)
    lp = TwinUniformQuantizer(bits=4)
    lp.init_range(x)  # Lp search: shrunk ranges, never wider than min-max
    assert 0 < float(lp.scale) <= float(q.scale) and 0 < float(lp.neg_scale) <= float(q.neg_scale)
    assert lp.initialized and float(lp.zero_point) == 0.0
    # several processes: the same search with reduced statistics (here one process)
    sharded = TwinUniformQuantizer(bits=4)
    sharded.init_range(x, LocalReducer())
    assert torch.equal(sharded.scale, lp.scale) and torch.equal(sharded.neg_scale, lp.neg_scale)
    # no negative value: any negative step, the positive one unchanged
    relu = TwinUniformQuantizer(bits=4)
    relu.init_range(x.clamp_min(0))
    assert torch.equal(relu.scale, lp.scale) and float(relu.neg_scale) > 0


def test_finer_than_uniform_on_the_negative_part():
    """Why it exists: GELU's negative values survive at 4 bits, where one uniform grid
    rounds most of them to 0."""
    x = _gelu(spread=3.0)
    twin, uni = TwinUniformQuantizer(bits=4), LSQQuantizer(bits=4)
    twin.init_range(x)
    uni.init_range(x)
    neg = x < 0
    with torch.no_grad():
        err_twin = (twin(x) - x)[neg].pow(2).sum()
        err_uni = (uni(x) - x)[neg].pow(2).sum()
    assert err_twin < 0.2 * err_uni


def test_gradients_flow_straight_through_and_to_the_positive_step():
    q = _quantizer(4, pos=0.5, neg=0.02)
    x = torch.tensor([-0.05, -1.0, 0.0, 0.7, 9.0], requires_grad=True)
    out = q(x)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out.backward(g)
    # inside its range an element passes the gradient once (0 too), outside none
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 0.0, 3.0, 4.0, 0.0]))
    # LSQ on the positive step: round(x/s) - x/s inside, qmax outside; scaled by 1/sqrt(N qmax)
    d = [0.0, 0.0, 0.0, round(0.7 / 0.5) - 0.7 / 0.5, 7.0]
    want = sum(gi * di for gi, di in zip(g.tolist(), d)) / math.sqrt(5 * 7)
    assert math.isclose(float(q.scale.grad), want, rel_tol=1e-5)
    assert not q.neg_scale.requires_grad  # the negative range stays as calibrated
    assert [n for n, p in q.named_parameters() if p.requires_grad] == ['scale']


def test_step_is_learned_by_an_optimizer():
    x = _gelu(seed=1)
    q = TwinUniformQuantizer(bits=3)
    q.init_range(x)
    s0, n0 = q.scale.detach().clone(), q.neg_scale.clone()
    opt = torch.optim.Adam([q.scale], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (q(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert not torch.equal(q.scale.detach(), s0) and torch.equal(q.neg_scale, n0)
    assert min(losses) <= losses[0]


def test_deterministic_and_state_dict_round_trip():
    x = _gelu(seed=2)
    a, b = TwinUniformQuantizer(bits=4), TwinUniformQuantizer(bits=4)
    a.init_range(x)
    b.init_range(x)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))
    c = TwinUniformQuantizer(bits=4)
    c.load_state_dict(a.state_dict())
    assert c.initialized and torch.equal(c(x), a(x)) and torch.equal(c.neg_scale, a.neg_scale)


def test_qdrop_keeps_float_values_in_training():
    x = _gelu(seed=3)
    q = TwinUniformQuantizer(bits=4)
    q.init_range(x)
    q.set_qdrop(0.5)
    torch.manual_seed(0)
    q.train()
    mixed = q(x)
    q.eval()
    quant = q(x)
    kept_float = (mixed == x) & (quant != x)
    assert 0.3 < kept_float.float().mean() / (quant != x).float().mean() < 0.7
    assert not q.fusable  # its grid is not the fused LSQ kernel's


def test_traced_graph_equals_eager():
    x = _gelu(seed=4)
    q = TwinUniformQuantizer(bits=4)
    q.init_range(x)
    q.eval()
    with torch.no_grad():
        traced = torch.jit.trace(q, x)
        assert torch.equal(traced(x), q(x))


def test_bad_bits_name_the_key():
    with pytest.raises(ValueError, match='bits=1'):
        TwinUniformQuantizer(bits=1)
    q = TwinUniformQuantizer(bits=4)
    with pytest.raises(ValueError, match='bits=9'):
        q.set_bits(9)
    q.set_bits(6)
    assert (q.qmin, q.qmax) == (-32, 31) and not q.initialized
    from mmbrecq import quantize_model
    with pytest.raises(ValueError, match=r'quant_cfg\.a_bits'):
        quantize_model(_tiny_vit(), dict(a_bits=1, transformer=dict(post_gelu=dict(type='TwinUniformQuantizer'))))
    with pytest.raises(ValueError, match=r'quant_cfg\.transformer\.post_gelu\.type'):
        quantize_model(_tiny_vit(), dict(transformer=dict(post_gelu=dict(type='TwinUniform'))))


def test_onnx_export_traces_the_twin_grid(tmp_path):
    """No QuantizeLinear form: the exported graph computes the twin grid with float ops and
    onnxruntime reproduces the fake-quant model."""
    pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    from mmbrecq import calibrate_activations, quantize_model
    from mmbrecq.export import export_onnx
    torch.manual_seed(0)
    model = quantize_model(_tiny_vit(), dict(w_bits=4, a_bits=4, keep_8bit=[],
                                             transformer=dict(post_gelu=dict(type='TwinUniformQuantizer'))))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calibrate_activations(model, [x])
    path = export_onnx(model, x[:1], str(tmp_path / 'twin.onnx'))
    # onnxruntime's extended graph fusions replace float ops around the grid (GELU, LayerNorm)
    # by kernels that round differently, which moves some codes of the fine negative grid; with
    # the basic rewrites the runtime computes the traced graph
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
    with torch.no_grad():
        ref = model(x)[0]
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
