"""Rules for vision transformers: mmpretrain's ``TransformerEncoderLayer`` (ViT, DeiT and the
families built on it) and ``SwinBlock`` (shifted windows, relative position bias, mask).

What is quantized (the ViT PTQ literature's placement): the input of every Linear (``qkv``
and the MLP's first Linear read the LayerNorm output, ``proj`` the attention output, the
MLP's second Linear the GELU output) and both operands of ``Q.K^T`` and ``softmax.V``
(:mod:`mmbrecq.modules.quant_attention`). LayerNorm, GELU, softmax and the residual adds
stay float, and so does the residual stream itself: no quantizer on the block input, whose
float value is also what the residual add reads.

``quant_cfg.transformer.unit`` picks the reconstruction unit:

* ``'layer'``: one encoder layer / Swin block (LN → attention → add → LN → MLP → add);
* ``'halves'``: the attention module (``attn``, after ``ln1``) and the MLP (``ffn.layers``,
  after ``ln2``) as two units; the LayerNorms and residual adds between them stay float and
  outside every unit.

Swin's blocks take ``(x, hw_shape)`` and its window attention a ``mask``: reconstruction runs
a unit on its cached input tensor alone, so these units remember the other arguments of
the model's last call (:class:`CallContext`) and reuse them when called with the tensor only.
"""
from torch import nn

from mmbrecq.modules.quant_attention import MATMUL_KINDS, attention_twin
from mmbrecq.modules.reparam import record_post_ln_pair
from mmbrecq.registry import BLOCK_RULES

from .base import BlockRule, _resolve

VIT_LAYER = 'mmpretrain.models.backbones.vision_transformer.TransformerEncoderLayer'
SWIN_BLOCK = 'mmpretrain.models.backbones.swin_transformer.SwinBlock'
FFN = 'mmcv.cnn.bricks.transformer.FFN'


class CallContext:
    """Forward pre-hook: the non-tensor arguments of the model's last call of a module,
    supplied again when the module is called with its input tensor alone.

    A unit's calls inside the model (calibration, capture) all use one input size, so the
    remembered ``hw_shape`` / ``mask`` are the ones that go with the cached inputs.
    """

    def __init__(self):
        self.args, self.kwargs = None, None

    def __call__(self, module, args, kwargs):
        if len(args) > 1 or kwargs:
            self.args, self.kwargs = tuple(args[1:]), dict(kwargs)
            return None
        if self.args is None:
            return None  # never called by the model yet: the module raises its own error
        return (args[0], ) + self.args, dict(self.kwargs)


def remember_call_context(module: nn.Module):
    if not any(isinstance(h, CallContext) for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(CallContext(), with_kwargs=True, prepend=True)


def _swap_attention(module: nn.Module) -> nn.Module:
    """Replace every mmpretrain attention module under ``module`` (or ``module`` itself) by
    its twin; return ``module`` or its twin."""
    twin = attention_twin(module)
    if twin is not None:
        return twin.from_float(module)
    for name, child in list(module.named_children()):
        new = _swap_attention(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _first_linear(module: nn.Module):
    return next((n for n, m in module.named_modules() if isinstance(m, nn.Linear)), None)


#: Swin's first LayerNorm feeds this Linear (through the window partition)
SWIN_QKV = 'attn.w_msa.qkv'


def _record_post_ln_pairs(layer: nn.Module):
    """LayerNorm -> Linear pairs of an encoder layer whose LayerNorm output feeds only that
    Linear, for the post-LayerNorm scale reparameterisation: ``ln1 -> attn.qkv`` (ViT),
    ``norm1 -> attn.w_msa.qkv`` (Swin) and ``ln2``/``norm2`` -> the MLP's first Linear. Swin's
    window attention zero-pads feature maps that are not a multiple of the window between
    ``norm1`` and ``qkv``, so that pair folds without a shift (a shifted LayerNorm output
    would pad with the wrong value; see :mod:`mmbrecq.quantizers.reparam`)."""
    if isinstance(layer, _types(VIT_LAYER)):
        record_post_ln_pair(layer, 'ln1', 'attn.qkv')
    elif isinstance(layer, _types(SWIN_BLOCK)):
        record_post_ln_pair(layer, 'norm1', SWIN_QKV, shift=False)
    ffn = getattr(layer, 'ffn', None)
    norm2 = 'ln2' if 'ln2' in layer._modules else 'norm2'
    fc1 = _first_linear(ffn) if ffn is not None else None
    if fc1 is not None and norm2 in layer._modules:
        record_post_ln_pair(layer, norm2, f'ffn.{fc1}')


def _types(*paths):
    return tuple(t for t in (_resolve(p) for p in paths) if t is not None)


def _mlp_input_kind(mlp: nn.Module, rel: str, prefix: str):
    """``post_ln`` for the MLP's first Linear, ``post_gelu`` for the others."""
    linears = [prefix + n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
    if rel not in linears:
        return None
    return 'post_ln' if rel == linears[0] else 'post_gelu'


class _TransformerRule(BlockRule):
    """Shared by the transformer rules: no block input quantizer, the attention twin swapped
    in, its operand quantizers attached, tensor kinds of the Linear inputs."""

    quantize_input = False
    #: the ``quant_cfg.transformer.unit`` this rule serves
    unit = 'layer'

    def active(self) -> bool:
        cfg = self.qcfg['transformer'] if self.qcfg is not None else {}
        return cfg.get('unit', 'layer') == self.unit

    def match(self, parent, name, module):
        return self.active() and self.matches(module)

    def entry_layers(self, block, layer_names):
        return []  # every Linear quantizes its own input

    def prepare(self, parent, name, module):
        _record_post_ln_pairs(module)
        return _swap_attention(module)

    def attach_quantizers(self, block, make_act):
        for m in block.modules():
            if hasattr(m, 'attach_matmul_quantizers'):
                m.attach_matmul_quantizers([make_act(kind) for kind in MATMUL_KINDS])
        cfg = self.qcfg['transformer']
        if not cfg['learn_entry_step']:
            self._fix_entry_step(block)
        else:
            self._sample_entry_step_grad(block, cfg['entry_step_stride'])

    @staticmethod
    def _fix_entry_step(block):
        """``transformer.learn_entry_step=False``: the unit's first Linear (``qkv``, or the MLP's
        first) keeps its input step as calibrated. That step is the only one whose gradient
        needs the Linear's data gradient (``dY . W``, a matmul the float forward+backward does
        not run): a transformer unit's input is a LayerNorm output, which no other unit learns
        (unlike chained CNN blocks, whose predecessor learns their input step)."""
        first = _first_linear(block)
        q = getattr(block.get_submodule(first), 'input_quantizer', None) if first is not None else None
        if q is not None and hasattr(q, 'fix_step'):
            q.fix_step()

    @staticmethod
    def _sample_entry_step_grad(block, stride):
        """``transformer.entry_step_stride``: the unit's first Linear estimates its input step's
        gradient from every ``stride``-th token (see ``QuantLinear.sample_input_step_grad``),
        which cuts the cost of the data gradient that only that step needs."""
        first = _first_linear(block)
        layer = block.get_submodule(first) if first is not None else None
        if hasattr(layer, 'sample_input_step_grad'):
            layer.sample_input_step_grad(stride)

    def input_kind(self, block, layer_name):
        if (layer_name == 'attn.qkv' and isinstance(block, _types(VIT_LAYER))
                or layer_name == SWIN_QKV and isinstance(block, _types(SWIN_BLOCK))):
            return 'post_ln'
        ffn = getattr(block, 'ffn', None)
        return None if ffn is None else _mlp_input_kind(ffn, layer_name, 'ffn.')


@BLOCK_RULES.register_module()
class TransformerEncoderLayerRule(_TransformerRule):
    """mmpretrain ``TransformerEncoderLayer`` as one unit (``quant_cfg.transformer.unit='layer'``)."""
    block_types = (VIT_LAYER, )
    kind = 'TransformerEncoderLayer'


@BLOCK_RULES.register_module()
class SwinBlockRule(_TransformerRule):
    """mmpretrain ``SwinBlock`` as one unit; its ``hw_shape`` argument is remembered."""
    block_types = (SWIN_BLOCK, )
    kind = 'SwinBlock'

    def prepare(self, parent, name, module):
        remember_call_context(module)
        return super().prepare(parent, name, module)


@BLOCK_RULES.register_module()
class TransformerAttentionHalfRule(_TransformerRule):
    """``attn`` of a ViT layer or Swin block as a unit (``unit='halves'``): ``qkv``, the two
    quantized matmuls and ``proj``; it reads ``ln1``'s output."""
    parent_types = (VIT_LAYER, SWIN_BLOCK)
    unit = 'halves'
    kind = 'Attention'

    def match(self, parent, name, module):
        parents = _types(*self.parent_types)
        return self.active() and name == 'attn' and bool(parents) and isinstance(parent, parents)

    def prepare(self, parent, name, module):
        remember_call_context(module)  # Swin's ShiftWindowMSA takes (query, hw_shape)
        _record_post_ln_pairs(parent)  # both halves' LayerNorms live in the layer, outside the units
        return _swap_attention(module)

    def input_kind(self, block, layer_name):
        return 'post_ln' if layer_name in ('qkv', SWIN_QKV.partition('.')[2]) else None  # ViT's, Swin's


@BLOCK_RULES.register_module()
class TransformerMLPHalfRule(_TransformerRule):
    """``ffn.layers`` of a transformer layer as a unit (``unit='halves'``): Linear → GELU →
    Linear, reading ``ln2``'s output; the FFN's residual add stays outside."""
    unit = 'halves'
    kind = 'MLP'

    def match(self, parent, name, module):
        ffn = _resolve(FFN)
        return self.active() and name == 'layers' and ffn is not None and isinstance(parent, ffn)

    def prepare(self, parent, name, module):
        return module

    def input_kind(self, block, layer_name):
        return _mlp_input_kind(block, layer_name, '')
