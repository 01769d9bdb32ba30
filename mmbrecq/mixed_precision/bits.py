"""Changing the weight bit width of quantized layers after the swap, and back.

A quantizer's grid (``bits``, ``qmin``, ``qmax``) is fixed at construction and checked
when a state dict is loaded (its extra state), so a mixed-precision model is built as a
uniform one and then re-gridded layer by layer here: new grid, range searched again on
the layer's weight at the new width (the Lp search of the configured quantizer),
rounding back to nearest (AdaRound's alpha is placed from the new grid when the
reconstruction enters soft rounding).
"""
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from mmbrecq.modules.quant_layers import QuantLayerMixin
from mmbrecq.quantizers import AdaRoundQuantizer, check_bits


@torch.no_grad()
def set_weight_bits(layer: QuantLayerMixin, bits: int, ranges: Optional[dict] = None):
    """Re-grid ``layer``'s weight quantizer at ``bits`` and initialise its range.

    Args:
        layer: a quantized layer (``QuantConv2d`` / ``QuantLinear``).
        bits: the new weight bit width.
        ranges: optional memo ``{(id(quantizer), bits): (scale, zero_point)}`` so that
            switching back and forth (the sensitivity measurement) searches each range once.
    """
    q = layer.weight_quantizer
    check_bits(bits, 'weight bits')
    if isinstance(q, AdaRoundQuantizer):
        q.set_rounding('nearest')
    if q.bits == bits and q.initialized and ranges is None:
        return q
    q.set_bits(bits)
    key = (id(q), bits)
    if ranges is not None and key in ranges:
        q.load_qparams(*ranges[key])
    else:
        q.init_range(layer.weight)
        if ranges is not None:
            ranges[key] = (q.scale.detach().clone(), q.zero_point.clone())
    return q


def weight_bits_of(model: nn.Module) -> Dict[str, int]:
    """``{layer name: weight bits}`` of every quantized layer."""
    return {n: m.weight_quantizer.bits for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


def apply_bit_map(model: nn.Module, bit_map: Mapping[str, int]) -> Dict[str, int]:
    """Set the weight bits of the named layers; returns ``{name: bits}`` of those changed.

    Raises:
        KeyError: a name that is not a quantized layer of ``model``.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}
    unknown = sorted(set(bit_map) - set(layers))
    if unknown:
        raise KeyError(f'bit map names layers the model does not have (another model?): {unknown[:5]}')
    changed = {}
    for name, bits in bit_map.items():
        if layers[name].weight_quantizer.bits != int(bits):
            set_weight_bits(layers[name], int(bits))
            changed[name] = int(bits)
    return changed


def bits_in_state_dict(model: nn.Module, state_dict: Mapping) -> Dict[str, int]:
    """Weight bits per layer as recorded in a state dict (the quantizers' extra state)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            extra = state_dict.get(f'{name}.weight_quantizer._extra_state')
            if isinstance(extra, dict) and 'bits' in extra:
                out[name] = int(extra['bits'])
    return out


def apply_saved_bits(model: nn.Module, state_dict: Mapping) -> Dict[str, int]:
    """Re-grid the weight quantizers to the bits a saved (mixed-precision) state dict holds,
    so that ``load_state_dict`` finds matching grids; returns the layers changed."""
    return apply_bit_map(model, bits_in_state_dict(model, state_dict))
