"""What the exporters share: finding the quantizers of a swapped model and their grids."""
import torch
from torch import nn

from mmbrecq.modules import QuantLayerMixin
from mmbrecq.modules.quant_attention import MATMUL_QUANTIZERS, QuantMatmulMixin
from mmbrecq.quantizers import UniformQuantizer


def quant_layers(model: nn.Module):
    """``[(name, layer)]`` of every QuantConv2d / QuantLinear, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def act_quantizers(model: nn.Module):
    """``[(name, quantizer)]`` of every quantizer that is not a layer's weight quantizer.

    These are the layers' ``input_quantizer`` children and the blocks' input quantizers
    (applied by the block's forward pre-hook).
    """
    weight_qs = {id(m.weight_quantizer) for _, m in quant_layers(model)}
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, UniformQuantizer) and id(m) not in weight_qs]


def block_input_quantizers(model: nn.Module):
    """``{block name: quantizer}`` of the quantizers blocks apply to their input."""
    layers = {n for n, _ in quant_layers(model)}
    out = {}
    for name, q in act_quantizers(model):
        owner, _, attr = name.rpartition('.')
        if attr == 'input_quantizer' and owner not in layers:
            out[owner] = q
    return out


def matmul_quantizers(model: nn.Module):
    """``{attention module name: {operand quantizer attribute: quantizer}}`` of every quantized
    attention twin (the operands of ``Q.K^T`` and ``softmax.V``; ``None`` operands left out)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantMatmulMixin):
            qs = {attr: getattr(m, attr) for attr in MATMUL_QUANTIZERS if getattr(m, attr, None) is not None}
            if qs:
                out[name] = qs
    return out


def quantizer_names(model: nn.Module):
    """Names of every quantizer module (their state is not part of a float model)."""
    return [n for n, m in model.named_modules() if isinstance(m, UniformQuantizer)]


def under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + '.') for p in prefixes)


def require_ready(name: str, q: UniformQuantizer):
    if not q.initialized:
        raise RuntimeError(f'{name}: quantizer range not initialised; calibrate the model '
                           '(mmbrecq.calibrate_activations) or load a quantized checkpoint before exporting')


def require_final_rounding(name: str, q: UniformQuantizer):
    if getattr(q, 'rounding', 'nearest') == 'soft':
        raise ValueError(f'{name}: AdaRound quantizer still in soft rounding (mid-reconstruction); '
                         "switch it to hard rounding (set_rounding('hard')) before exporting")


@torch.no_grad()
def weight_codes(name: str, layer) -> torch.Tensor:
    """The integer codes of ``layer``'s weight, checked to reproduce its fake-quant weight.

    ``(codes - zero_point) * scale`` must equal what ``weight_quantizer(weight)`` returns,
    bit for bit: that is what the integer checkpoint and the ONNX graph store.
    """
    q = layer.weight_quantizer
    require_ready(f'{name}.weight_quantizer', q)
    require_final_rounding(f'{name}.weight_quantizer', q)
    if not q.enabled:
        raise ValueError(f'{name}: weight quantization is disabled (set_quant_state(weight=False)); '
                         'there is no integer weight to export')
    w = layer.weight.detach()
    codes = q.integer_repr(w)
    s, z = q._broadcast(q.scale.detach(), w), q._broadcast(q.zero_point, w)
    if not torch.equal((codes - z) * s, q(w)):
        raise RuntimeError(f'{name}: the integer codes do not reproduce the fake-quantized weight')
    return codes
