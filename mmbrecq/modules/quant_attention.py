"""Quantized twins of mmpretrain's attention modules: both operands of every matmul quantized.

mmpretrain's ``MultiheadAttention`` (ViT, DeiT and the families built on
``TransformerEncoderLayer``) calls ``F.scaled_dot_product_attention``, whose fused kernel
hides its operands; ``WindowMSA`` (Swin) writes ``q @ k^T`` and ``attn @ v`` itself. The
twins run an eager path with four activation quantizers (role ``'act'``, so calibration,
``set_quant_state`` and reconstruction see them like any other):

* ``q_quantizer`` and ``k_quantizer``: the operands of ``Q.K^T``;
* ``attn_quantizer`` (the softmax output) and ``v_quantizer``: the operands of ``softmax.V``.

Q, K and V are taken from the ``qkv`` output with ``unbind`` rather than the float modules'
three ``qkv[i]``: the same views, but in a reconstruction step's backward one ``stack`` of
their gradients instead of three zero-filled full-size ``qkv`` gradients added up
(``benchmarks/bench_recon_iteration.py --profile``).

The softmax, the scale, the relative position bias and the shifted-window mask stay float
(they are elementwise). ``qkv`` and ``proj`` are ordinary ``nn.Linear`` children, swapped to
``QuantLinear`` by :func:`mmbrecq.quantize_model` as everywhere else.

A twin *is* the float module (same class hierarchy, same attributes, same children, so
parameter names and checkpoints do not change) with a different ``forward``. When all four
matmul quantizers are off, ``QuantMultiheadAttention`` calls the very function the float
module calls (``scaled_dot_product_attention``), so "quantization off" is the float model bit
for bit; the eager formula it uses otherwise agrees with PyTorch's fused kernel to float
rounding (see tests/test_modules_quant_attention.py).
"""
import copy
import importlib

import torch
from torch import nn

#: names of the matmul operand quantizers of a twin, in the order they are applied
MATMUL_QUANTIZERS = ('q_quantizer', 'k_quantizer', 'attn_quantizer', 'v_quantizer')
#: tensor kind of each operand (``quant_cfg.transformer`` selects a quantizer per kind)
MATMUL_KINDS = ('matmul', 'matmul', 'softmax', 'matmul')
_TWIN_CLASSES = {}


def _twin_of(cls, module: nn.Module) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s parameters, buffers, children and settings.

    The module dictionaries are copied (not shared), so quantizers added to the twin do not
    appear in the float module.
    """
    twin = cls.__new__(cls)
    state = dict(module.__dict__)
    for key, value in state.items():
        if isinstance(value, (dict, set)):
            state[key] = copy.copy(value)
    twin.__dict__.update(state)
    return twin


class QuantMatmulMixin:
    """The four matmul-operand quantizers and the two quantized products."""

    @classmethod
    def from_float(cls, attn):
        """The twin of ``attn``, its matmuls still float (see :meth:`attach_matmul_quantizers`)."""
        key = (cls, type(attn))
        if key not in _TWIN_CLASSES:  # one class per float class: isinstance checks see both
            _TWIN_CLASSES[key] = type(f'Quant{type(attn).__name__}', key, {'__module__': __name__})
        twin = _twin_of(_TWIN_CLASSES[key], attn)
        for name in MATMUL_QUANTIZERS:
            twin.add_module(name, None)
        return twin

    def attach_matmul_quantizers(self, quantizers):
        """Set the four operand quantizers (``None`` entries leave that operand float)."""
        if len(quantizers) != len(MATMUL_QUANTIZERS):
            raise ValueError(f'{type(self).__name__} needs {len(MATMUL_QUANTIZERS)} quantizers '
                             f'{MATMUL_QUANTIZERS}, got {len(quantizers)}')
        for name, q in zip(MATMUL_QUANTIZERS, quantizers):
            self.add_module(name, q)

    def matmul_quantizers(self):
        return [getattr(self, n) for n in MATMUL_QUANTIZERS if getattr(self, n, None) is not None]

    def _any_matmul_quantized(self) -> bool:
        return any(q.enabled for q in self.matmul_quantizers())

    @staticmethod
    def _operand(q, x):
        return x if q is None else q(x)

    def quantized_scores(self, q, k, scale=None):
        """``Q.K^T`` on quantized operands (``q`` already scaled if the float module scales it),
        times ``scale`` if given: applied to the quantized ``Q`` (tokens x head dims) rather
        than to the scores (tokens x tokens), a smaller tensor in every step of a
        reconstruction and its backward; the same floats when ``scale`` is a power of two
        (``1/sqrt(64)`` of ViT/DeiT/Swin heads), equal to rounding otherwise."""
        q = self._operand(self.q_quantizer, q)
        if scale is not None:
            q = q * scale
        return q @ self._operand(self.k_quantizer, k).transpose(-2, -1)

    def quantized_context(self, attn, v):
        """``softmax.V`` on quantized operands."""
        return self._operand(self.attn_quantizer, attn) @ self._operand(self.v_quantizer, v)


class QuantMultiheadAttention(QuantMatmulMixin, nn.Module):
    """Twin of ``mmpretrain.models.utils.attention.MultiheadAttention`` (built by :meth:`from_float`)."""

    def _eager_attention(self, q, k, v, dropout_p):
        sdpa = self.scaled_dot_product_attention
        # mmpretrain's qk_scale path is a partial of its Python implementation, which divides
        # the scores by the ``scale`` it is given; the default (SDPA) multiplies by 1/sqrt(d)
        keywords = getattr(sdpa, 'keywords', {})
        if 'scale' in keywords:
            attn = self.quantized_scores(q, k) / keywords['scale']
        else:
            attn = self.quantized_scores(q, k, scale=q.size(-1)**-0.5)
        attn = torch.softmax(attn, dim=-1)
        if dropout_p > 0:
            attn = torch.dropout(attn, dropout_p, True)
        return self.quantized_context(attn, v)

    def forward(self, x, force_eager=False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (see the module docstring)
        attn_drop = self.attn_drop if self.training else 0.
        if force_eager or self._any_matmul_quantized():
            x = self._eager_attention(q, k, v, attn_drop)
        else:  # quantization off: the float module's own call, bit for bit
            x = self.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop)
        x = x.transpose(1, 2).reshape(B, N, self.embed_dims)
        x = self.proj(x)
        x = self.out_drop(self.gamma1(self.proj_drop(x)))
        if self.v_shortcut:
            x = v.squeeze(1) + x
        return x


class QuantWindowMSA(QuantMatmulMixin, nn.Module):
    """Twin of mmpretrain's ``WindowMSA`` (Swin): relative position bias and mask kept float."""

    def forward(self, x, mask=None):
        # the float module's operations in the float module's order (so that quantization
        # off is exactly the float forward), with the operands quantized
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (see the module docstring)
        q = q * self.scale
        attn = self.quantized_scores(q, k)
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.quantized_context(attn, v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


#: import path of the float attention class -> its quantized twin (subclasses match too)
QUANT_ATTENTION_TYPES = {
    'mmpretrain.models.utils.attention.MultiheadAttention': QuantMultiheadAttention,
    'mmpretrain.models.utils.attention.WindowMSA': QuantWindowMSA,
}


def _resolve(path):
    module_name, _, attr = path.rpartition('.')
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):  # mmpretrain is optional
        return None


def attention_twin(module: nn.Module):
    """The quantized twin class for a float attention module, or ``None``."""
    if isinstance(module, QuantMatmulMixin):
        return None
    for path, twin in QUANT_ATTENTION_TYPES.items():
        cls = _resolve(path)
        if cls is not None and isinstance(module, cls):
            return twin
    return None
