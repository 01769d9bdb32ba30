"""``quant_cfg.recon``: reconstruction settings with their defaults and checks."""
import copy

DEFAULT_RECON = dict(
    type='BlockReconstructor',
    granularity='block',       # 'block' (BRECQ) | 'layer' (layer-wise AdaRound baseline)
    iters=20000,               # optimisation steps per unit (paper: 20k)
    batch_size=32,             # samples drawn at random from the unit's cache per step
    lam=0.01,                  # rounding-regulariser weight (paper: 0.01, 0.1 for MobileNetV2)
    b_range=(20, 2),           # β annealed from 20 to 2 …
    warmup=0.2,                # … after this fraction of iterations without regulariser
    weight_lr=1e-3,            # Adam lr of AdaRound's alpha
    act_lr=4e-5,               # Adam lr of the LSQ steps (cosine decay)
    act_mode='joint',          # 'joint' (alpha and steps together) | 'two_stage' (reference)
    act_iters=None,            # two_stage: iterations of the step stage (default: iters)
    loss='fisher_diag',        # 'fisher_diag' | 'mse'
    fisher_weight='abs_plus_one',  # (|g|+1)^2 as the reference; 'normalized' | 'raw' (see README)
    task_loss=None,            # TASK_LOSSES config; None: the calibration set's (classifier KL / detector divergence)
    input_mix='quant',         # unit input from 'quant' model, 'fp' model, or 'qdrop' mix
    qdrop_prob=0.5,            # qdrop: probability of keeping the quantized value
    on_nan='fail',             # non-finite loss: 'fail' the run | fall back to 'nearest'
    seed=0,
    cache=dict(),              # CacheBudget args: device_gb, host_gb, disk_dir
    progress=True,             # progress bar with ETA over units x iterations
    check_every=100,           # iterations between finiteness checks (one host sync each)
)

CHOICES = dict(granularity=('block', 'layer'), act_mode=('joint', 'two_stage'),
               loss=('fisher_diag', 'mse'), fisher_weight=('normalized', 'abs_plus_one', 'raw'),
               input_mix=('quant', 'fp', 'qdrop'), on_nan=('fail', 'nearest'))


def recon_config(cfg=None):
    """Merge ``cfg`` over the defaults; a wrong key or value is a ``ValueError`` naming it."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_RECON))
    if unknown:
        raise ValueError(f'unknown key(s) in quant_cfg.recon: {unknown}; valid: {sorted(DEFAULT_RECON)}')
    merged = copy.deepcopy(DEFAULT_RECON)
    merged.update(copy.deepcopy(cfg))
    for key, allowed in CHOICES.items():
        if merged[key] not in allowed:
            raise ValueError(f'quant_cfg.recon.{key}={merged[key]!r}: expected one of {allowed}')
    for key in ('iters', 'batch_size'):
        if not isinstance(merged[key], int) or merged[key] < 1:
            raise ValueError(f'quant_cfg.recon.{key} must be a positive integer, got {merged[key]!r}')
    if not 0 <= merged['warmup'] < 1:
        raise ValueError(f'quant_cfg.recon.warmup must be in [0, 1), got {merged["warmup"]!r}')
    if not 0 < merged['qdrop_prob'] <= 1:
        raise ValueError(f'quant_cfg.recon.qdrop_prob must be in (0, 1], got {merged["qdrop_prob"]!r}')
    return merged
