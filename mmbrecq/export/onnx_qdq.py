"""ONNX export of a fake-quantized model as QuantizeLinear / DequantizeLinear (QDQ) pairs.

During the export every enabled quantizer's ``forward`` is replaced by one autograd
Function whose eager forward returns exactly the fake-quantized values and whose
``symbolic`` emits ``QuantizeLinear -> DequantizeLinear`` (TorchScript exporter,
``dynamo=False``: a Python ``symbolic`` is how a custom node is written there).

Weights (per channel, ``axis = ch_axis``, int8): the weight initializer holds the
fake-quantized weight ``(q - z) * s`` (AdaRound's rounding decisions included), which
``QuantizeLinear`` maps back onto exactly the codes ``q``. The grid ``[qmin, qmax]`` is
shifted into int8 by ``shift = -((qmin + qmax + 1) // 2)`` (``[0, 15] -> [-8, 7]``,
``[0, 255] -> [-128, 127]``, signed grids unchanged) with the zero point shifted alike,
so ``DequantizeLinear`` gives ``(q - z) * s`` bit for bit. No clipping is needed: the
codes already lie on the grid.

Activations (per tensor): uint8 for unsigned grids, int8 for signed ones, zero point
unchanged. A grid narrower than the container (fewer than 8 bits) is enforced by a
``Clip`` to ``[(qmin - z) s, (qmax - z) s]`` before ``QuantizeLinear``: the clipped value
quantizes to ``qmin``/``qmax``, as the fake quantizer's clamp does.

Rounding is the same on both sides (``x / s``, round half to even, then ``+ z``), so an
ONNX runtime reproduces the PyTorch fake-quant model up to the float arithmetic of the
convolutions themselves: a value within an ulp of a rounding boundary can move by one
step. That is rare, except in a model whose folded biases are all zero (a freshly
initialised network, BN at its defaults): its conv outputs are integer multiples of
``s_in * s_w`` and land *exactly* on ties of the next grid, where the two runtimes'
summation orders pick different sides. 16-bit grids do not fit 8-bit QDQ and are refused.

Biases stay float, as in the fake-quant model. onnxruntime's graph optimiser
(``WeightBiasQuantization``, on from ``ORT_ENABLE_BASIC``) rewrites the float bias of a
QDQ Conv/Gemm into int32 with scale ``s_in * s_w``, as an integer kernel would: that
rounding moves the outputs slightly away from the fake-quant model (at 4 bits it flips
codes downstream). :func:`onnxruntime_session` with ``exact=True`` disables just that
rewrite, which makes onnxruntime reproduce PyTorch to float rounding.
"""
import contextlib
import functools
import importlib.util
import warnings

import torch
from torch import nn

from mmbrecq.utils import atomic_path

from ._common import act_quantizers, quant_layers, require_ready, weight_codes


class QDQSpec:
    """What one quantizer exports as: ONNX scale / zero point (container dtype), axis, clip."""

    def __init__(self, name, scale, zero_point, axis=None, clip=None, eager=None):
        self.name = name
        self.scale = scale.detach().to(torch.float32).cpu().clone()
        self.zero_point = zero_point.cpu().clone()
        self.axis = axis
        self.clip = clip
        self.eager = eager

    def symbolic(self, g, x):
        s = g.op('Constant', value_t=self.scale)
        z = g.op('Constant', value_t=self.zero_point)
        if self.clip is not None:
            lo, hi = (g.op('Constant', value_t=t) for t in self.clip)
            x = g.op('Clip', x, lo, hi)
        kw = {} if self.axis is None else dict(axis_i=self.axis)
        q = g.op('QuantizeLinear', x, s, z, **kw)
        return g.op('DequantizeLinear', q, s, z, **kw)


class _QDQFunction(torch.autograd.Function):
    """Eager: the quantizer's own fake quantization. Export: Q/DQ nodes from the spec."""

    @staticmethod
    def forward(ctx, x, spec):
        return spec.eager(x)

    @staticmethod
    def symbolic(g, x, spec):
        return spec.symbolic(g, x)


def _qdq_forward(spec, x):
    return _QDQFunction.apply(x, spec)


def _fake_quant(scale, zero_point, qmin, qmax, x):
    """The activation quantizers' forward values (same operations, same rounding)."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def _weight_spec(name, layer, codes):
    q = layer.weight_quantizer
    if q.qmax - q.qmin > 255:
        raise ValueError(f'{name}: {q.bits}-bit weights do not fit an 8-bit QuantizeLinear')
    shift = -((q.qmin + q.qmax + 1) // 2)
    lo, hi = int(codes.min()) + shift, int(codes.max()) + shift
    if lo < -128 or hi > 127:  # cannot happen for a grid of <= 256 levels; kept as a guard
        raise ValueError(f'{name}: shifted weight codes [{lo}, {hi}] leave int8')
    zp = (q.zero_point.detach().round() + shift).to(torch.int8)
    return QDQSpec(f'{name}.weight_quantizer', q.scale, zp, axis=q.ch_axis, eager=torch.clone)


def _act_spec(name, q):
    require_ready(name, q)
    if q.ch_axis is not None:
        raise NotImplementedError(f'{name}: per-channel activation quantizers are not exportable')
    if q.qmin >= 0 and q.qmax <= 255:
        dtype, full = torch.uint8, (0, 255)
    elif q.qmin >= -128 and q.qmax <= 127:
        dtype, full = torch.int8, (-128, 127)
    else:
        raise ValueError(f'{name}: {q.bits}-bit activations [{q.qmin}, {q.qmax}] do not fit an 8-bit '
                         'QuantizeLinear')
    s, z = q.scale.detach(), q.zero_point.detach()
    clip = None
    if (q.qmin, q.qmax) != full:
        clip = (((q.qmin - z) * s).to(torch.float32).cpu(), ((q.qmax - z) * s).to(torch.float32).cpu())
    # Python numbers, not the quantizer's tensors: the tracer fails on tensors read inside a
    # Function's forward that are no input of the node (parameters, and even detached copies
    # once the quantizer runs twice, e.g. a detector head shared by the pyramid levels).
    # float32 -> float -> float32 is exact, so the values are those of the quantizer.
    eager = functools.partial(_fake_quant, float(s), float(z), q.qmin, q.qmax)
    return QDQSpec(name, s, z.round().to(dtype), clip=clip, eager=eager)


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module):
    """Within: every enabled quantizer of ``model`` traces as a Q/DQ pair.

    Weights of quantized layers temporarily hold their fake-quantized values; the model,
    its weights and its quantizers are restored on exit. Yields the list of specs, in
    the order weights first, then activations.
    """
    patched, swapped, specs = [], [], []
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, layer in quant_layers(model):
                q = layer.weight_quantizer
                if not q.enabled:
                    continue  # weight quantization off: the float weight is exported as is
                codes = weight_codes(name, layer)
                spec = _weight_spec(name, layer, codes)
                w_fq = q(layer.weight).detach()
                swapped.append((layer.weight, layer.weight.data))
                layer.weight.data = w_fq
                specs.append(spec)
                patched.append((q, spec))
            for name, q in act_quantizers(model):
                # a non-uniform grid (Log2Quantizer) has no Q/DQ form: its own float ops are traced
                if q.enabled and getattr(q, 'qdq_exportable', True):
                    spec = _act_spec(name, q)
                    specs.append(spec)
                    patched.append((q, spec))
        for q, spec in patched:
            q.forward = functools.partial(_qdq_forward, spec)
        yield specs
    finally:
        for q, _ in patched:
            q.__dict__.pop('forward', None)
        for p, data in swapped:
            p.data = data
        model.train(training)


class ExportWrapper(nn.Module):
    """The module handed to the exporter: ``model(x, mode='tensor')`` or ``model(x)``.

    Its state dict leaves out non-tensor entries (the quantizers' ``_extra_state``),
    which the TorchScript tracer cannot handle.
    """

    def __init__(self, model, tensor_mode):
        super().__init__()
        self.model = model
        self.tensor_mode = tensor_mode

    def forward(self, x):
        return self.model(x, mode='tensor') if self.tensor_mode else self.model(x)

    def state_dict(self, *args, destination=None, prefix='', keep_vars=False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for k in [k for k, v in out.items() if k.startswith(prefix) and not isinstance(v, torch.Tensor)]:
            del out[k]
        return out


def _wrap(model):
    from mmengine.model import BaseModel
    return ExportWrapper(model, tensor_mode=isinstance(model, BaseModel))


def _num_outputs(out):
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (list, tuple)):
        return sum(_num_outputs(o) for o in out)
    if isinstance(out, dict):
        return sum(_num_outputs(o) for o in out.values())
    raise TypeError(f'model output of type {type(out).__name__} cannot be exported')


def export_onnx(qmodel: nn.Module, example_input: torch.Tensor, path: str, opset: int = 13,
                dynamic_batch: bool = True, input_name: str = 'input') -> str:
    """Export the fake-quantized ``qmodel`` to ``path`` as an ONNX QDQ model; return ``path``.

    An OpenMMLab model (``mmengine.model.BaseModel``) is exported in ``mode='tensor'``:
    the input is the *preprocessed* batch (the data preprocessor's normalisation is not
    in the graph) and the outputs are the head's raw outputs (logits for a classifier).
    Other modules are exported as ``module(x)``. Opset >= 13 (per-channel QDQ).
    """
    if opset < 13:
        raise ValueError(f'opset={opset}: per-channel QuantizeLinear/DequantizeLinear needs opset >= 13')
    if not isinstance(example_input, torch.Tensor):
        raise TypeError('example_input must be one tensor (the batch of images)')
    if importlib.util.find_spec('onnx') is None:  # torch's exporter serialises through it
        raise ImportError('ONNX export needs the onnx package: pip install onnx (and onnxruntime to run the '
                          'model; see requirements/optional.txt)')
    wrapped = _wrap(qmodel)
    device = next(qmodel.parameters()).device
    example_input = example_input.to(device)
    with qdq_export_mode(qmodel):
        with torch.no_grad():
            n_out = _num_outputs(wrapped(example_input))
        output_names = ['output'] if n_out == 1 else [f'output_{i}' for i in range(n_out)]
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {input_name: {0: 'batch'}, **{n: {0: 'batch'} for n in output_names}}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # TorchScript-exporter deprecation and tracer warnings
            with atomic_path(path) as tmp:  # a killed export leaves the previous file, never half of one
                torch.onnx.export(wrapped, (example_input, ), tmp, dynamo=False, opset_version=opset,
                                  input_names=[input_name], output_names=output_names,
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
    return path


def onnxruntime_session(path: str, exact: bool = True, threads: int = None):
    """An onnxruntime CPU session for ``path`` (all graph optimisations on).

    ``exact=True`` disables onnxruntime's ``WeightBiasQuantization`` rewrite (float bias
    to int32, see the module docstring), so outputs match the fake-quant model.
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    disabled = ['WeightBiasQuantization'] if exact else None
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'], disabled_optimizers=disabled)


def qdq_node_counts(onnx_path: str) -> dict:
    """``{op_type: count}`` of an ONNX file's graph (needs the ``onnx`` package)."""
    import onnx
    counts = {}
    for node in onnx.load(onnx_path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
