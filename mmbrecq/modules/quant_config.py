"""``quant_cfg``: the user's quantization settings, validated with errors that name the key."""
import copy
import fnmatch

from mmbrecq.quantizers import check_bits

#: every key ``quant_cfg`` accepts, with its default. Sections read by later stages
#: (calibration, reconstruction, mixed precision) are validated by those stages.
DEFAULTS = dict(
    w_bits=4,
    a_bits=4,
    keep_8bit=['first', 'last'],
    overrides=[],
    skip=[],
    fold_bn=True,
    weight_quantizer=dict(type='AdaRoundQuantizer', init='lp', p=2.4, num_candidates=100),
    act_quantizer=dict(type='LSQQuantizer', init='lp', p=2.4, num_candidates=100),
    block_rules=None,
    # transformers (ViT/DeiT TransformerEncoderLayer, SwinBlock; mmbrecq/blocks/transformer.py):
    # the reconstruction unit, and an activation quantizer per tensor kind (None: act_quantizer)
    # (defaults measured on the digits ViT: README, "Transformer choices")
    transformer=dict(
        unit='halves',         # 'halves': attention and MLP apart | 'layer': a whole encoder layer
        matmul=None,           # Q, K (of Q.K^T) and V (of softmax.V)
        softmax=dict(type='Log2Quantizer'),  # the softmax output (of softmax.V); base sqrt(2)
        post_ln=None,          # inputs of qkv and of the MLP's first Linear (or ChannelReparamQuantizer)
        post_gelu=None,        # input of the MLP's second Linear
    ),
    calib=dict(),
    recon=dict(),
    mixed_precision=None,
)
FLOAT_ACT_BITS = (None, 32)
#: tensor kinds that ``quant_cfg.transformer`` can give their own activation quantizer
TENSOR_KINDS = ('matmul', 'softmax', 'post_ln', 'post_gelu')
TRANSFORMER_UNITS = ('layer', 'halves')


def _check_act_bits(bits, key):
    return None if bits in FLOAT_ACT_BITS else check_bits(bits, key)


class QuantConfig:
    """Parsed ``quant_cfg`` plus the per-layer bit decisions derived from it."""

    def __init__(self, quant_cfg):
        if quant_cfg is None:
            raise ValueError('the config has no quant_cfg section: add quant_cfg=dict(w_bits=..., '
                             'a_bits=...) (see configs/brecq/ and the README)')
        cfg = dict(quant_cfg)
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ValueError(f'unknown key(s) in quant_cfg: {unknown}; valid keys: {sorted(DEFAULTS)}')
        merged = copy.deepcopy(DEFAULTS)
        merged.update(copy.deepcopy(cfg))
        self.cfg = merged
        self.w_bits = check_bits(merged['w_bits'], 'quant_cfg.w_bits')
        self.a_bits = _check_act_bits(merged['a_bits'], 'quant_cfg.a_bits')
        for key in ('keep_8bit', 'skip', 'overrides'):
            if merged[key] is not None and not isinstance(merged[key], (list, tuple)):
                raise ValueError(f'quant_cfg.{key} must be a list, got {merged[key]!r}')
        self.keep_8bit = list(merged['keep_8bit'] or [])
        self.skip = list(merged['skip'] or [])
        self.overrides = []
        for i, o in enumerate(merged['overrides'] or []):
            key = f'quant_cfg.overrides[{i}]'
            if not isinstance(o, dict) or 'pattern' not in o:
                raise ValueError(f'{key} must be a dict with a "pattern" key, got {o!r}')
            extra = set(o) - {'pattern', 'w_bits', 'a_bits'}
            if extra:
                raise ValueError(f'{key} has unknown key(s) {sorted(extra)}; allowed: pattern, w_bits, a_bits')
            if 'w_bits' in o:
                check_bits(o['w_bits'], f'{key}.w_bits')
            if 'a_bits' in o:
                _check_act_bits(o['a_bits'], f'{key}.a_bits')
            self.overrides.append(dict(o))
        if merged['mixed_precision'] is not None:
            from mmbrecq.mixed_precision.config import mp_config  # late: that package imports this one
            mp_config(merged['mixed_precision'])
        for key in ('weight_quantizer', 'act_quantizer'):
            if not isinstance(merged[key], dict) or 'type' not in merged[key]:
                raise ValueError(f'quant_cfg.{key} must be a dict with a "type" key')
        self._check_transformer(cfg.get('transformer', {}))

    def _check_transformer(self, user):
        """``quant_cfg.transformer``: merged key by key over its defaults."""
        if not isinstance(user, dict):
            raise ValueError(f'quant_cfg.transformer must be a dict, got {user!r}')
        allowed = ('unit', ) + TENSOR_KINDS
        unknown = sorted(set(user) - set(allowed))
        if unknown:
            raise ValueError(f'unknown key(s) in quant_cfg.transformer: {unknown}; valid keys: {list(allowed)}')
        merged = copy.deepcopy(DEFAULTS['transformer'])
        merged.update(copy.deepcopy(user))
        if merged['unit'] not in TRANSFORMER_UNITS:
            raise ValueError(f'quant_cfg.transformer.unit={merged["unit"]!r}: expected one of {TRANSFORMER_UNITS}')
        for kind in TENSOR_KINDS:
            c = merged[kind]
            if c is not None and (not isinstance(c, dict) or 'type' not in c):
                raise ValueError(f'quant_cfg.transformer.{kind} must be None or a dict with a "type" key, got {c!r}')
        self.cfg['transformer'] = merged

    def kind_quantizers(self):
        """``{tensor kind: quantizer cfg}`` for the kinds with their own quantizer type."""
        t = self.cfg['transformer']
        return {k: dict(t[k]) for k in TENSOR_KINDS if t[k] is not None}

    def __getitem__(self, key):
        return self.cfg[key]

    # -- per-layer decisions ------------------------------------------------------------
    def check_patterns(self, layer_names):
        """Every pattern must match at least one quantizable layer: a typo is an error."""
        def check(key, pattern):
            if not fnmatch.filter(layer_names, pattern):
                raise ValueError(f'{key}: pattern {pattern!r} matches no quantizable layer; '
                                 f'layers are e.g. {layer_names[:3] + layer_names[-2:]}')
        for p in self.skip:
            check('quant_cfg.skip', p)
        for p in self.keep_8bit:
            if p not in ('first', 'last'):
                check('quant_cfg.keep_8bit', p)
        for i, o in enumerate(self.overrides):
            check(f'quant_cfg.overrides[{i}].pattern', o['pattern'])

    def is_skipped(self, name):
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def bits_for(self, name, first, last):
        """(w_bits, a_bits) of the layer ``name``; ``a_bits`` is that of its input."""
        w, a = self.w_bits, self.a_bits
        for p in self.keep_8bit:
            if (p == 'first' and name == first) or (p == 'last' and name == last) or (
                    p not in ('first', 'last') and fnmatch.fnmatchcase(name, p)):
                w, a = max(w, 8), (None if a is None else max(a, 8))
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o['pattern']):
                w = o.get('w_bits', w)
                a = _check_act_bits(o['a_bits'], 'a_bits') if 'a_bits' in o else a
        return w, a
