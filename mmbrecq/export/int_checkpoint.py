"""Integer checkpoint of a quantized model, and a float checkpoint with the quantized weights baked in.

Integer checkpoint (``format='mmbrecq.int.v1'``), a plain dict of tensors, numbers,
strings, lists and dicts (``torch.load(path, weights_only=True)`` reads it)::

    format, mmbrecq_version
    quant_cfg      the quant_cfg the model was swapped with (plain dicts/lists)
    bits           {layer: {'weight': w_bits, 'input': a_bits or None}, block: {'input': a_bits}}
    layers         {layer name: {
                       'type': 'QuantConv2d' | 'QuantLinear',
                       'weight': {bits, qmin, qmax, ch_axis, shape, scale (C,) float,
                                  zero_point (C,) int32, codes, packing},
                       'bias': float tensor or None,        # after BN folding
                       'input': activation entry or None}}  # the layer's own input quantizer
    block_inputs   {block name: activation entry}           # quantizers applied to a block's input
    float_state    every other entry of the model's state dict (unquantized layers, ...)

    activation entry: {type, bits, qmin, qmax, scale () float, zero_point () int32, enabled, initialized}

Weight codes are the quantizer's own integers ``q`` in ``[qmin, qmax]`` (no shift), so
``w = (q - zero_point[c]) * scale[c]`` along ``ch_axis``. Containers: ``uint8`` for unsigned
grids of up to 8 bits (the default asymmetric grid ``[0, 2^b - 1]``), ``int8`` for signed
ones, ``int32`` for 16-bit ones. With ``pack=True`` (the default) grids of at most 16
levels (<= 4 bits) are packed two codes per byte: ``packing='nibble'``, codes flattened in
C order, stored as ``q - qmin`` (0..15), element ``2i`` in the low nibble of byte ``i`` and
element ``2i+1`` in its high nibble (a zero nibble pads an odd count).

Loading swaps a float model with the stored quant_cfg and sets each quantized weight to
``(q - zero_point) * scale`` with nearest rounding: re-quantizing that weight gives ``q``
back exactly, so the loaded model's fake-quant outputs are bit-identical to those of the
saved one (whatever rounding AdaRound had chosen). The float weights themselves are not
stored: an integer checkpoint cannot resume a reconstruction.
"""
import copy
import os.path as osp
from collections import OrderedDict

import torch
from torch import nn

from mmbrecq.mixed_precision.bits import apply_bit_map
from mmbrecq.modules import QuantConfig, fold_bn, quantize_model
from mmbrecq.modules.bn_fold import adjacent_children
from mmbrecq.utils import atomic_save, load_checkpoint_file
from mmbrecq.version import __version__

from ._common import (
    act_quantizers,
    block_input_quantizers,
    quant_layers,
    quantizer_names,
    require_ready,
    under,
    weight_codes,
)

FORMAT = 'mmbrecq.int.v1'


# ---------------------------------------------------------------------------------------
# integer codes: containers and 4-bit packing
# ---------------------------------------------------------------------------------------
def _container(qmin, qmax):
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int32


def pack_nibbles(codes: torch.Tensor, qmin: int) -> torch.Tensor:
    """Two codes of a <= 16-level grid per byte (see the module docstring for the layout)."""
    v = (codes.reshape(-1).to(torch.int32) - qmin)
    if v.numel() and (v.min() < 0 or v.max() > 15):
        raise ValueError('pack_nibbles: codes span more than 16 levels')
    if v.numel() % 2:
        v = torch.cat([v, v.new_zeros(1)])
    return (v[0::2] | (v[1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, qmin: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int32 codes of ``shape``."""
    b = packed.to(torch.int32)
    v = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)
    n = 1
    for d in shape:
        n *= int(d)
    return (v[:n] + qmin).reshape(tuple(shape))


def _codes_of(entry) -> torch.Tensor:
    if entry['packing'] == 'nibble':
        return unpack_nibbles(entry['codes'], entry['qmin'], entry['shape'])
    if entry['packing'] is not None:
        raise ValueError(f'unknown weight packing {entry["packing"]!r}')
    return entry['codes'].to(torch.int32).reshape(tuple(entry['shape']))


# ---------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------
def _plain(obj, key='quant_cfg'):
    """``obj`` as builtin dicts/lists/tuples/scalars (QuantConfig and mmengine ConfigDicts included)."""
    if isinstance(obj, QuantConfig):
        obj = obj.cfg
    if isinstance(obj, dict):
        return {str(k): _plain(v, f'{key}.{k}') for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v, f'{key}[{i}]') for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [_plain(v, f'{key}[{i}]') for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f'{key}: {type(obj).__name__} cannot be stored in an integer checkpoint')


def _act_entry(name, q):
    if q.enabled:  # a disabled one may never have been calibrated: kept as it is
        require_ready(name, q)
    if q.ch_axis is not None:
        raise NotImplementedError(f'{name}: per-channel activation quantizers are not exportable')
    if not getattr(q, 'qdq_exportable', True):  # a non-uniform grid (log2, twin uniform): no (scale, zero point)
        raise NotImplementedError(f'{name}: {type(q).__name__} has no single-grid integer form')
    return dict(type=type(q).__name__, bits=q.bits, qmin=q.qmin, qmax=q.qmax,
                scale=q.scale.detach().cpu().clone(), zero_point=q.zero_point.detach().cpu().to(torch.int32),
                enabled=bool(q.enabled), initialized=bool(q.initialized))


def _weight_entry(name, layer, pack):
    q = layer.weight_quantizer
    codes = weight_codes(name, layer).cpu()
    entry = dict(bits=q.bits, qmin=q.qmin, qmax=q.qmax, ch_axis=q.ch_axis, shape=list(codes.shape),
                 scale=q.scale.detach().cpu().clone(), zero_point=q.zero_point.detach().cpu().to(torch.int32))
    if pack and q.qmax - q.qmin <= 15:
        entry.update(codes=pack_nibbles(codes, q.qmin), packing='nibble')
    else:
        entry.update(codes=codes.to(_container(q.qmin, q.qmax)), packing=None)
    return entry


@torch.no_grad()
def to_integer_checkpoint(qmodel: nn.Module, quant_cfg, pack: bool = True) -> dict:
    """The integer checkpoint of a swapped, calibrated ``qmodel`` (layout: module docstring).

    ``quant_cfg`` must be the one ``qmodel`` was swapped with (it is what
    :func:`load_integer_checkpoint` rebuilds the model from).
    """
    if quant_cfg is None:
        raise ValueError('to_integer_checkpoint needs the quant_cfg the model was quantized with')
    if not isinstance(_plain(quant_cfg), dict):
        raise TypeError(f'quant_cfg must be a dict, got {type(quant_cfg).__name__}')
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError(f'{type(qmodel).__name__} has no quantized layer: '
                         'swap it with mmbrecq.quantize_model first')
    layer_names = {n for n, _ in layers}
    blocks = block_input_quantizers(qmodel)
    known = {id(q) for q in blocks.values()} | {id(m.input_quantizer) for _, m in layers}
    stray = [n for n, q in act_quantizers(qmodel) if id(q) not in known]
    if stray:
        raise NotImplementedError(f'quantizers outside layer and block inputs cannot be exported: {stray[:5]}')

    out_layers, bits = OrderedDict(), OrderedDict()
    for name, layer in layers:
        in_q = layer.input_quantizer
        out_layers[name] = dict(
            type=type(layer).__name__,
            weight=_weight_entry(name, layer, pack),
            bias=None if layer.bias is None else layer.bias.detach().cpu().clone(),
            input=None if in_q is None else _act_entry(f'{name}.input_quantizer', in_q))
        bits[name] = dict(weight=layer.weight_quantizer.bits, input=None if in_q is None else in_q.bits)
    out_blocks = OrderedDict()
    for name, q in blocks.items():
        out_blocks[name] = _act_entry(f'{name}.input_quantizer', q)
        bits[name] = dict(input=q.bits)

    skip = quantizer_names(qmodel)
    float_state = OrderedDict()
    for k, v in qmodel.state_dict().items():
        if under(k, skip) or _is_layer_param(k, layer_names):
            continue
        float_state[k] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
    return dict(format=FORMAT, mmbrecq_version=__version__, quant_cfg=_plain(quant_cfg),
                bits=bits, layers=out_layers, block_inputs=out_blocks, float_state=float_state)


def save_integer_checkpoint(qmodel: nn.Module, quant_cfg, path: str, pack: bool = True) -> str:
    """Write :func:`to_integer_checkpoint` to ``path``; return ``path``."""
    return atomic_save(to_integer_checkpoint(qmodel, quant_cfg, pack=pack), path)


# ---------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------
def read_integer_checkpoint(path) -> dict:
    """The checkpoint dict at ``path`` (tensors and builtins only: read with ``weights_only``)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'integer checkpoint {path!r} does not exist')
    ckpt = load_checkpoint_file(path, what='integer checkpoint')
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        fmt = ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f'{path} is not an mmbrecq integer checkpoint (format={fmt!r}, expected {FORMAT!r})')
    return ckpt


def _fill_grid(name, q, entry, device):
    if (q.bits, q.qmin, q.qmax) != (entry['bits'], entry['qmin'], entry['qmax']):
        raise ValueError(f'{name}: the checkpoint holds a {entry["bits"]}-bit grid '
                         f'[{entry["qmin"]}, {entry["qmax"]}] where the model has {q.bits} bits '
                         f'[{q.qmin}, {q.qmax}]')
    if tuple(q.scale.shape) != tuple(entry['scale'].shape):
        raise ValueError(f'{name}: scale of shape {tuple(entry["scale"].shape)} in the checkpoint, '
                         f'{tuple(q.scale.shape)} in the model')
    q.load_qparams(entry['scale'].to(device), entry['zero_point'].to(device=device, dtype=q.zero_point.dtype))


def _fill_act(name, q, entry, device):
    if (q is None) != (entry is None):
        raise ValueError(f'{name}: {"no" if q is None else "an"} input quantizer in the model, '
                         f'{"none" if entry is None else "one"} in the checkpoint (another quant_cfg?)')
    if q is not None:
        _fill_grid(name, q, entry, device)
        q.enabled = entry['enabled']
        if not entry['initialized']:
            q.reset_range()


def _is_layer_param(key, layers):
    owner, _, attr = key.rpartition('.')
    return owner in layers and attr in ('weight', 'bias')


def _check_same(what, model_names, ckpt_names):
    if set(model_names) != set(ckpt_names):
        only_m = sorted(set(model_names) - set(ckpt_names))[:5]
        only_c = sorted(set(ckpt_names) - set(model_names))[:5]
        raise ValueError(f'{what} differ between the model and the integer checkpoint: only in the model '
                         f'{only_m}, only in the checkpoint {only_c} (another model or quant_cfg?)')


@torch.no_grad()
def load_integer_checkpoint(float_model: nn.Module, path, quant_cfg=None) -> nn.Module:
    """Swap ``float_model`` and fill it from an integer checkpoint (a path or its dict).

    The model is swapped with ``quant_cfg`` (default: the stored one); its quantized
    weights become ``(q - zero_point) * scale`` with nearest rounding, which re-quantizes
    to ``q`` exactly: outputs are bit-identical to the saved model's. Returns the model.
    """
    ckpt = path if isinstance(path, dict) else read_integer_checkpoint(path)
    qcfg = copy.deepcopy(_plain(quant_cfg if quant_cfg is not None else ckpt['quant_cfg']))
    qcfg['weight_quantizer'] = dict(qcfg.get('weight_quantizer', QuantConfig({}).cfg['weight_quantizer']))
    qcfg['weight_quantizer']['num_candidates'] = 1  # ranges come from the checkpoint: skip the search
    model = quantize_model(float_model, qcfg)
    device = next(model.parameters()).device

    layers = dict(quant_layers(model))
    blocks = block_input_quantizers(model)
    _check_same('quantized layers', layers, ckpt['layers'])
    _check_same('block input quantizers', blocks, ckpt['block_inputs'])
    if (ckpt['quant_cfg'] or {}).get('mixed_precision') is not None:
        # searched per-layer bits: they come from the checkpoint, not from quant_cfg (for a
        # uniform checkpoint a quant_cfg with other bits stays an error, checked per layer)
        apply_bit_map(model, {n: e['weight']['bits'] for n, e in ckpt['layers'].items()})

    filled = set(quantizer_names(model))
    missing, unexpected = model.load_state_dict(ckpt['float_state'], strict=False)
    missing = [k for k in missing if not (under(k, filled) or _is_layer_param(k, layers))]
    if missing or unexpected:
        raise ValueError(f'integer checkpoint does not match the model: missing keys {missing[:5]}, '
                         f'unexpected keys {unexpected[:5]}')

    for name, layer in layers.items():
        entry = ckpt['layers'][name]
        w = entry['weight']
        wq = layer.weight_quantizer
        if wq.ch_axis != w['ch_axis'] or list(layer.weight.shape) != list(w['shape']):
            raise ValueError(f'{name}: weight {list(layer.weight.shape)} (channel axis {wq.ch_axis}) in the '
                             f'model, {list(w["shape"])} (channel axis {w["ch_axis"]}) in the checkpoint')
        _fill_grid(f'{name}.weight_quantizer', wq, w, device)
        if hasattr(wq, 'set_rounding'):
            wq.set_rounding('nearest')
        wq.enabled = True
        codes = _codes_of(w).to(device)
        s, z = wq._broadcast(wq.scale.detach(), layer.weight), wq._broadcast(wq.zero_point, layer.weight)
        layer.weight.data.copy_((codes.to(s.dtype) - z) * s)
        if not torch.equal(wq.integer_repr(layer.weight).to(torch.int32), codes):
            raise RuntimeError(f'{name}: dequantized weight does not re-quantize to the stored codes')
        if (layer.bias is None) != (entry['bias'] is None):
            raise ValueError(f'{name}: bias {"absent" if layer.bias is None else "present"} in the model but not '
                             'in the checkpoint (BN folding differs?)')
        if layer.bias is not None:
            layer.bias.data.copy_(entry['bias'].to(device))
        _fill_act(f'{name}.input_quantizer', layer.input_quantizer, entry['input'], device)
    for name, q in blocks.items():
        _fill_act(f'{name}.input_quantizer', q, ckpt['block_inputs'][name], device)
    return model


# ---------------------------------------------------------------------------------------
# float checkpoint with the quantized weights baked in
# ---------------------------------------------------------------------------------------
def _folded_pairs_structural(qmodel):
    """(conv, bn) name pairs that ``fold_bn`` folded, recognised without the float model.

    A folded BN left an ``nn.Identity`` registered right after a conv child that has a
    bias; the BN is assumed affine with running statistics, and the conv is assumed to
    have had no bias of its own (conv + BN: the usual case).
    """
    return [(conv_name, bn_name) for conv_name, conv, bn_name, bn in adjacent_children(qmodel)
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.Identity and conv.bias is not None]


def _is_identity(model, name):
    try:
        return type(model.get_submodule(name)) is nn.Identity
    except AttributeError:
        return False


@torch.no_grad()
def bake_float_checkpoint(qmodel: nn.Module, float_model: nn.Module = None, bn_eps: float = 1e-5):
    """State dict of the *float* model with the quantized weights baked in.

    Every quantized layer's weight becomes its fake-quantized weight (as the quantizer
    is set: a disabled weight quantizer leaves the float weight); quantizer state is
    dropped. BatchNorms that the swap folded into their conv come back as identities
    carrying the folded bias: ``weight=1, bias=folded bias, running_mean=0,
    running_var=1-eps`` (so ``(x - 0) / sqrt(1 - eps + eps) * 1 + b = x + b``). The stock
    float model loads the result with ``strict=True`` and computes what ``qmodel``
    computes with activation quantization off.

    ``float_model``: an unquantized instance of the same model (e.g. freshly built from
    the config). With it, the keys, conv biases and BN eps are taken from it and checked;
    without it, folded BNs are recognised structurally (an ``nn.Identity`` right after a
    conv with a bias), assumed affine with ``eps=bn_eps`` and their conv bias-free.
    """
    layers = dict(quant_layers(qmodel))
    skip = quantizer_names(qmodel)
    sd = OrderedDict()
    for k, v in qmodel.state_dict().items():
        if not under(k, skip):
            sd[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    for name, layer in layers.items():
        sd[f'{name}.weight'] = layer.quantized_weight().detach().clone()

    if float_model is not None:
        template = copy.deepcopy(float_model).eval()
        float_keys = template.state_dict()
        pairs = [(c, b) for c, b in fold_bn(template) if _is_identity(qmodel, b)]
        bns = {b: float_model.get_submodule(b) for _, b in pairs}
        conv_has_bias = {c: float_model.get_submodule(c).bias is not None for c, _ in pairs}
    else:
        pairs = _folded_pairs_structural(qmodel)
        bns = {b: None for _, b in pairs}
        conv_has_bias = {c: False for c, _ in pairs}

    for conv_name, bn_name in pairs:
        _unfold_bn(sd, conv_name, bn_name, bns[bn_name], conv_has_bias[conv_name], bn_eps)

    if float_model is None:
        return sd
    return _like_float_model(sd, float_keys)


def _unfold_bn(sd, conv_name, bn_name, bn, conv_has_bias, bn_eps):
    """Give the folded BN ``bn_name`` back to ``sd`` as an identity carrying the folded bias
    (``bn``: the float model's BN, or ``None``: affine with ``eps=bn_eps``)."""
    bias = sd[f'{conv_name}.bias']
    affine = bn.affine if bn is not None else True
    eps = bn.eps if bn is not None else bn_eps
    if conv_has_bias:
        beta = torch.zeros_like(bias)
    elif affine:
        beta = sd.pop(f'{conv_name}.bias')
    else:
        raise ValueError(f'{conv_name}: a bias-free conv folded with a non-affine BN ({bn_name}) has no '
                         'parameter to hold the folded bias in the float model')
    ones = torch.ones_like(bias)
    if affine:
        sd[f'{bn_name}.weight'] = ones.clone()
        sd[f'{bn_name}.bias'] = beta
    sd[f'{bn_name}.running_mean'] = torch.zeros_like(bias)
    sd[f'{bn_name}.running_var'] = ones * (1.0 - eps)
    sd[f'{bn_name}.num_batches_tracked'] = torch.tensor(0, dtype=torch.long)


def _like_float_model(sd, float_keys):
    """``sd`` in the float model's key order, shapes checked and dtypes matched."""
    extra = sorted(set(sd) - set(float_keys))
    absent = sorted(set(float_keys) - set(sd))
    if extra or absent:
        raise ValueError(f'baked state dict does not match the float model: missing {absent[:5]}, '
                         f'unexpected {extra[:5]}')
    out = OrderedDict()
    for k, ref in float_keys.items():
        v = sd[k]
        if isinstance(ref, torch.Tensor):
            if k.endswith('num_batches_tracked'):
                v = ref.clone()
            if tuple(v.shape) != tuple(ref.shape):
                raise ValueError(f'{k}: shape {tuple(v.shape)} baked, {tuple(ref.shape)} in the float model')
            v = v.to(dtype=ref.dtype)
        out[k] = v
    return out


__all__ = [
    'FORMAT', 'to_integer_checkpoint', 'save_integer_checkpoint', 'read_integer_checkpoint',
    'load_integer_checkpoint', 'bake_float_checkpoint', 'pack_nibbles', 'unpack_nibbles'
]
