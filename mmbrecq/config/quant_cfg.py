"""The ``quant_cfg`` section a user writes: every key, its default and its check, in one place.

``validate_quant_cfg(cfg)`` returns the merged config (nested sections included) or raises
a ``ValueError`` naming the full key path (``quant_cfg.recon.iters must be a positive
integer, got True``). The stages read the merged values: :class:`mmbrecq.modules.QuantConfig`
(bits per layer), the calibration (``calib``), the reconstruction (``recon``) and the
mixed-precision search (``mixed_precision``).
"""
import inspect
import re

from mmbrecq.quantizers import check_bits
from mmbrecq.registry import BLOCK_RULES, COST_MODELS, QUANTIZERS, RECONSTRUCTORS, SEARCHERS, TASK_LOSSES

from .schema import (
    ConfigError,
    Key,
    Section,
    boolean,
    integer,
    is_int,
    is_number,
    list_of,
    name_of,
    non_negative_int,
    number_in,
    one_of,
    optional,
    positive_int,
    registered,
    string,
)

#: activation bits that mean "not quantized"
FLOAT_ACT_BITS = (None, 32)
#: what ``keep_8bit``'s 'first' and 'last' keep at 8 bits (see mmbrecq.modules.QuantConfig.bits_for):
#: 'mmbrecq': the image, the first layer's weights, the last layer's weights and input;
#: 'reference': the reference code's placement, the first layer's weights and output (the
#: image stays float), the last layer's weights (its input at a_bits)
CONVENTIONS = ('mmbrecq', 'reference')
#: how gradients of the task loss become per-element weights (see reconstruction.objective)
FISHER_WEIGHTS = ('normalized', 'abs_plus_one', 'raw')


def bits(v, path):
    try:
        return check_bits(v, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def act_bits(v, path):
    return None if v in FLOAT_ACT_BITS else bits(v, path)


# -- top level -----------------------------------------------------------------------------
def _override(v, path):
    if not isinstance(v, dict) or 'pattern' not in v:
        raise ConfigError(f'{path} must be a dict with a "pattern" key, got {v!r}')
    extra = set(v) - {'pattern', 'w_bits', 'a_bits'}
    if extra:
        raise ConfigError(f'{path} has unknown key(s) {sorted(extra)}; allowed: pattern, w_bits, a_bits')
    string(v['pattern'], f'{path}.pattern')
    if 'w_bits' in v:
        bits(v['w_bits'], f'{path}.w_bits')
    if 'a_bits' in v:
        act_bits(v['a_bits'], f'{path}.a_bits')
    return dict(v)


# -- calib ---------------------------------------------------------------------------------
def _pad_to(v, path):
    if v is None or v == 'max' or (isinstance(v, (list, tuple)) and len(v) == 2
                                    and all(is_int(x) and x > 0 for x in v)):
        return v
    raise ConfigError(f"{path}={v!r}: expected 'max', (height, width) or None")


CALIB = Section(dict(
    num_samples=Key(1024, positive_int),
    batch_size=Key(32, positive_int),
    split=Key('train', one_of('train', 'val', 'test')),
    dataloader=Key(None, optional(lambda v, p: v if isinstance(v, dict) else _not_dict(v, p))),
    seed=Key(0, integer),
    pad_to=Key('max', _pad_to),          # 'max' (largest calibration image), (H, W), or None
    act_stream=Key('auto', one_of('auto', 'float', 'quantized')),  # activation ranges: float model (CNNs) |
                                                                   # quantized stream (transformers)
    num_proposals=Key(256, positive_int),  # two-stage detectors: fixed float-model proposals per image
))


def _not_dict(v, path):
    raise ConfigError(f'{path} must be a dataloader config dict, got {v!r}')


# -- recon ---------------------------------------------------------------------------------
def _b_range(v, path):
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(is_number(x) and x > 0 for x in v)):
        raise ConfigError(f'{path} must be a pair of positive numbers (start, end), got {v!r}')
    return tuple(v)


def _cache(v, path):
    if not isinstance(v, dict):
        raise ConfigError(f'{path} must be a dict, got {v!r}')
    unknown = sorted(set(v) - {'device_gb', 'host_gb', 'disk_dir'})
    if unknown:
        raise ConfigError(f'unknown key(s) in {path}: {unknown}; valid keys: device_gb, host_gb, disk_dir')
    for k in ('device_gb', 'host_gb'):
        if v.get(k) is not None:
            number_in(0, None)(v[k], f'{path}.{k}')
    return dict(v)


RECON = Section(dict(
    type=Key('BlockReconstructor', name_of(RECONSTRUCTORS, 'reconstructor')),
    granularity=Key('block', one_of('block', 'layer')),   # BRECQ | layer-wise AdaRound baseline
    iters=Key(20000, positive_int),                        # optimisation steps per unit (paper: 20k)
    batch_size=Key(32, positive_int),                      # samples drawn from the unit's cache per step
    lam=Key(0.01, number_in(0, None)),                     # rounding-regulariser weight (0.1 for MobileNetV2)
    b_range=Key((20, 2), _b_range),                        # beta annealed from 20 to 2 ...
    warmup=Key(0.2, number_in(0, 1, hi_open=True)),        # ... after this fraction without regulariser
    weight_lr=Key(1e-3, number_in(0, None)),             # Adam lr of AdaRound's alpha (0: frozen)
    act_lr=Key(4e-5, number_in(0, None)),                # Adam lr of the LSQ steps (cosine decay)
    act_mode=Key('joint', one_of('joint', 'two_stage', 'two_pass')),  # alpha and steps together | per unit,
                                                            # alpha then steps | all alpha, then all steps
    act_iters=Key(None, optional(positive_int)),            # two_stage / two_pass: step iterations (default: iters)
    loss=Key('fisher_diag', one_of('fisher_diag', 'mse')),
    fisher_weight=Key('abs_plus_one', one_of(*FISHER_WEIGHTS)),  # (|g|+1)^2 as the reference code
    task_loss=Key(None, optional(registered(TASK_LOSSES, 'task loss'))),  # None: the calibration set's
    input_mix=Key('quant', one_of('quant', 'fp', 'qdrop')),  # unit input: quantized / float model / QDrop mix
    qdrop_prob=Key(0.5, number_in(0, 1, lo_open=True)),     # qdrop: probability of keeping the quantized value
    qdrop_placement=Key('all', one_of('all', 'input', 'inner')),  # qdrop: where values are dropped
    on_nan=Key('fail', one_of('fail', 'nearest')),          # non-finite loss: fail | fall back to nearest
    seed=Key(0, integer),
    cache=Key({}, _cache),                                  # CacheBudget: device_gb, host_gb, disk_dir
    progress=Key(True, boolean),                            # progress bar with ETA
    check_every=Key(100, positive_int),                     # iterations between finiteness checks
))


# -- mixed_precision -----------------------------------------------------------------------
#: budget key -> the cost model that measures it
BUDGET_KEYS = dict(size_mb='ModelSize', bops='BOPs', latency_ms='LatencyTable')
UNIFORM_RE = re.compile(r'^uniform_w(\d+)$')

SENSITIVITY = Section(dict(
    iters=Key(0, non_negative_int),          # 0: nearest rounding; > 0: AdaRound steps per candidate
    fisher_weight=Key('raw', one_of(*FISHER_WEIGHTS)),  # g^2, the paper's diagonal Fisher
    max_combos=Key(27, positive_int),        # every per-layer combination up to this many, else 2nd order
    act_quant=Key(False, boolean),           # quantize the unit's activations while measuring
    fisher_model=Key('full', one_of('full', 'prefix')),  # Fisher with the whole model quantized | up to the unit
))


def _budget(v, path):
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in BUDGET_KEYS:
        raise ConfigError(f'{path} must be a dict with exactly one of {sorted(BUDGET_KEYS)}, got {v!r}')
    (key, value), = v.items()
    if isinstance(value, str):
        m = UNIFORM_RE.match(value)
        if not m:
            raise ConfigError(f"{path}.{key}={value!r}: a number or 'uniform_w<bits>' "
                             "(e.g. 'uniform_w3': the cost of uniform 3-bit weights)")
        bits(int(m[1]), f'{path}.{key} (uniform bits)')
    elif not is_number(value) or not value > 0:
        raise ConfigError(f'{path}.{key} must be a positive number, got {value!r}')
    return dict(v)


def _candidates(v, path):
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f'{path} must be a non-empty list of bit widths, got {v!r}')
    for i, b in enumerate(v):
        bits(b, f'{path}[{i}]')
    if len(set(v)) != len(v):
        raise ConfigError(f'{path} has duplicates: {list(v)}')
    return tuple(sorted(v))


def searcher_args(cls):
    """Keyword arguments of a searcher class (what ``quant_cfg.mixed_precision`` passes it)."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _searcher_extra(merged, unknown, path):
    """The searcher's own arguments: keys of the searcher class's signature."""
    allowed = searcher_args(SEARCHERS.get(merged['type']))
    bad = sorted(set(unknown) - allowed)
    if bad:
        raise ConfigError(f'unknown key(s) in {path}: {bad}; valid: {sorted(set(MIXED_PRECISION.keys) | allowed)}')
    merged['searcher'] = dict(unknown)
    return merged


def _mp_finalize(merged, path):
    """A budget, cost model vs budget, the latency table, a trial construction of the searcher."""
    if merged['budget'] is None:
        raise ConfigError(f'{path}.budget must be a dict with exactly one of {sorted(BUDGET_KEYS)}, got None')
    merged.setdefault('searcher', {})
    (bkey, bval), = merged['budget'].items()
    merged['budget_key'], merged['budget_value'] = bkey, bval
    implied = BUDGET_KEYS[bkey]
    cm = merged['cost_model'] or implied
    name_of(COST_MODELS, 'cost model')(cm, f'{path}.cost_model')
    if cm in BUDGET_KEYS.values() and cm != implied:
        raise ConfigError(f'{path}.cost_model={cm!r} does not measure budget.{bkey} '
                         f'(that is {implied}); drop cost_model or change the budget key')
    merged['cost_model'] = cm
    if cm == 'LatencyTable' and not merged['latency_table']:
        raise ConfigError(f'{path}.latency_table: budget.latency_ms needs a latency table file '
                         '(.json / .csv with layer, w_bits, a_bits, latency_ms)')
    if merged['latency_table'] and cm != 'LatencyTable':
        raise ConfigError(f'{path}.latency_table is only read with budget.latency_ms')
    try:
        SEARCHERS.get(merged['type'])(**merged['searcher'])
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{path}: the {merged["type"]} arguments are invalid: {e}') from None
    return merged


MIXED_PRECISION = Section(dict(
    type=Key('GeneticSearcher', name_of(SEARCHERS, 'searcher')),
    budget=Key(None, _budget),        # exactly one of size_mb / bops / latency_ms
    candidates=Key((2, 4, 8), _candidates),
    cost_model=Key(None, optional(string)),   # default: from the budget key
    latency_table=Key(None, optional(string)),
    sensitivity=SENSITIVITY,
), optional=True, default_none=True, extra=_searcher_extra, finalize=_mp_finalize)

# -- transformer ---------------------------------------------------------------------------
#: tensor kinds that ``quant_cfg.transformer`` can give their own activation quantizer
TENSOR_KINDS = ('matmul', 'softmax', 'post_ln', 'post_gelu')
_quantizer_or_none = optional(registered(QUANTIZERS, 'quantizer'))

# ViT/DeiT TransformerEncoderLayer, SwinBlock (mmbrecq/blocks/transformer.py): the unit, and
# an activation quantizer per tensor kind (None: act_quantizer)
TRANSFORMER = Section(dict(
    unit=Key('halves', one_of('halves', 'layer')),  # attention and MLP apart | a whole encoder layer
    matmul=Key(None, _quantizer_or_none),           # Q, K (of Q.K^T) and V (of softmax.V)
    softmax=Key(dict(type='Log2Quantizer'), _quantizer_or_none),  # the softmax output (of softmax.V); base sqrt(2)
    post_ln=Key(None, _quantizer_or_none),          # inputs of qkv and of the MLP's first Linear (or
                                                    # ChannelReparamQuantizer)
    post_gelu=Key(None, _quantizer_or_none),        # input of the MLP's second Linear
    learn_entry_step=Key(True, boolean),            # learn the step of each unit's first Linear input
                                                    # (False: kept at its calibrated value)
    entry_step_stride=Key(1, positive_int),         # ... its gradient from every k-th token (1: all)
))

# -- the whole section ---------------------------------------------------------------------
QUANT_CFG = Section(dict(
    w_bits=Key(4, bits),
    a_bits=Key(4, act_bits),
    keep_8bit=Key(['first', 'last'], optional(list_of(string))),   # 'first', 'last' or name patterns
    convention=Key('mmbrecq', one_of(*CONVENTIONS)),                 # what 'first' / 'last' keep at 8 bits
    overrides=Key([], optional(list_of(_override))),
    skip=Key([], optional(list_of(string))),
    fold_bn=Key(True, boolean),
    weight_quantizer=Key(dict(type='AdaRoundQuantizer', init='lp', p=2.4, num_candidates=100),
                         registered(QUANTIZERS, 'quantizer')),
    act_quantizer=Key(dict(type='LSQQuantizer', init='lp', p=2.4, num_candidates=100),
                      registered(QUANTIZERS, 'quantizer')),
    block_rules=Key(None, optional(list_of(name_of(BLOCK_RULES, 'block rule')))),  # None: every rule
    transformer=TRANSFORMER,
    calib=CALIB,
    recon=RECON,
    mixed_precision=MIXED_PRECISION,
))


def validate_quant_cfg(cfg):
    """The merged ``quant_cfg`` (defaults filled in, every section checked)."""
    if cfg is None:
        raise ConfigError('the config has no quant_cfg section: add quant_cfg=dict(w_bits=..., '
                         'a_bits=...) (see configs/brecq/ and the README)')
    return QUANT_CFG.validate(_plain(cfg), 'quant_cfg')


def _plain(cfg):
    """mmengine ``ConfigDict`` → dict (recursively), so the merged config holds builtins only."""
    to_dict = getattr(cfg, 'to_dict', None)
    return to_dict() if callable(to_dict) else cfg


def recon_config(cfg=None):
    """``quant_cfg.recon`` merged over its defaults (``type`` may be left out)."""
    return RECON.validate(dict(cfg or {}), 'quant_cfg.recon')


def calib_config(cfg=None):
    """``quant_cfg.calib`` merged over its defaults."""
    return CALIB.validate(dict(cfg or {}), 'quant_cfg.calib')


def mp_config(cfg):
    """``quant_cfg.mixed_precision`` merged and checked; adds ``searcher`` (the searcher's own
    arguments) and ``budget_key`` / ``budget_value``."""
    if cfg is None:
        raise ConfigError('quant_cfg.mixed_precision must be a dict (or None), got None')
    return MIXED_PRECISION.validate(cfg, 'quant_cfg.mixed_precision')


DEFAULT_RECON = RECON.defaults()
DEFAULT_CALIB = CALIB.defaults()
DEFAULT_SENSITIVITY = SENSITIVITY.defaults()
DEFAULTS = QUANT_CFG.defaults()
