"""Optimisation of one unit: AdaRound's alpha and the LSQ steps against the cached targets.

The hot loop avoids host synchronisation: batch indices are drawn on the cache's device,
losses are written into a preallocated device tensor, and finiteness is checked only
every ``check_every`` iterations (one sync each).
"""
import contextlib
import math

import torch

from mmbrecq.modules import quantizers_of, set_quant_state
from mmbrecq.quantizers import AdaRoundQuantizer, LSQQuantizer

from .distributed import StepSharding, broadcast_quantizers, mask_seed
from .objective import RoundingSchedule, quantized_reconstruction_loss, reconstruction_loss
from .units import UnitData, entry_quantizer, unit_layers


class NonFiniteLoss(FloatingPointError):
    pass


def step_quantizers(unit, out_quantizer=None, input_learned=False):
    """The LSQ quantizers whose steps a unit learns.

    As in the reference code, the quantizer "after a block's add+ReLU" is learned with
    that block: when the next unit reads this unit's output, its input quantizer is
    applied to this unit's output during the optimisation (``out_quantizer``) and the
    next unit then keeps it fixed (``input_learned``). Besides matching the reference,
    this spares every step the gradient w.r.t. the cached input (a data-gradient
    convolution of the first layer). Steps kept fixed (``learn_step`` off) are not learned.
    """
    skip = entry_quantizer(unit) if input_learned else None
    aq = [q for q in quantizers_of(unit.module, 'act')
          if isinstance(q, LSQQuantizer) and q.enabled and q.learn_step and q is not skip]
    if out_quantizer is not None:
        aq.append(out_quantizer)
    return aq


def _param_groups(unit, cfg, aq, with_alpha=True, with_steps=True):
    wq = [q for q in quantizers_of(unit.module, 'weight') if isinstance(q, AdaRoundQuantizer)]
    groups = []
    if with_alpha and wq:
        groups.append(dict(params=[q.alpha for q in wq], lr=cfg['weight_lr'], cosine=False))
    for q in aq:
        q.scale.requires_grad_(with_steps)
    if with_steps and aq:
        groups.append(dict(params=[q.scale for q in aq], lr=cfg['act_lr'], cosine=True))
    return wq, aq, groups


def _run_stage(unit, data: UnitData, cfg, iters, groups, wq, aq, use_round, seed, progress, stage,
               out_quantizer=None):
    """One optimisation stage; returns the loss history (iters x 2: reconstruction, rounding).

    QDrop (``input_mix='qdrop'``): the unit's input quantizer quantizes only the elements
    that the step drew from the quantized stream (:meth:`LSQQuantizer.set_stream_mask`);
    the unit's other activation quantizers (and the output quantizer it learns) keep each
    quantized value with probability ``qdrop_prob``. ``qdrop_placement`` keeps one of the
    two (``'input'`` / ``'inner'``, an ablation) or both (``'all'``, the QDrop paper).
    """
    device = data.y_fp[0].budget.device
    hist = torch.zeros(iters, 2, device=device)
    if not groups or iters == 0:
        return hist
    # the fused Adam kernel: one pass over all parameters instead of a loop of small
    # kernels per tensor (a block has many alpha tensors)
    opt = torch.optim.Adam([dict(params=g['params'], lr=g['lr']) for g in groups], fused=True)
    cosine = [g['cosine'] for g in groups]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [(lambda it: 0.5 * (1 + math.cos(math.pi * it / iters))) if c else (lambda it: 1.0)
              for c in cosine])
    rounding = RoundingSchedule(iters, cfg['warmup'], cfg['b_range'])
    shard = StepSharding(data, cfg['batch_size'])  # several processes: each its part of the global batch
    gen = torch.Generator(device=shard.index_device).manual_seed(seed)
    zero = torch.zeros((), device=device)
    bs, mix, check = cfg['batch_size'], cfg['input_mix'], cfg['check_every']
    placement = cfg['qdrop_placement'] if mix == 'qdrop' else None
    if placement == 'inner':
        mix = 'quant'  # the input wholly from the quantized stream
    entry = _qdrop_entry(unit) if mix == 'qdrop' else None
    unit_input = entry_quantizer(unit)
    for q in aq:
        inner = placement in ('all', 'inner') and q is not unit_input
        q.set_qdrop(cfg['qdrop_prob'] if inner else None)
        q.train()
    step, reported = max(1, iters // 50), 0
    try:
        for it in range(iters):
            idx = torch.randint(shard.total, (bs, ), generator=gen, device=shard.index_device)
            idx, share = shard.local(idx)
            rec = zero
            for k in range(data.calls if len(idx) else 0):
                x, y, w, from_q = data.batch(k, idx, mix, cfg['qdrop_prob'])
                if entry is not None:
                    entry.set_stream_mask(from_q)
                out = unit.forward(x)
                if out_quantizer is not None:  # quantize the output inside the loss: one fused node
                    rec = rec + quantized_reconstruction_loss(out, out_quantizer, y, w)
                else:
                    rec = rec + reconstruction_loss(out, y, w)
            beta = rounding(it) if use_round else None
            reg = zero if beta is None else cfg['lam'] * sum(q.round_loss(beta) for q in wq)
            rec, reg = shard.scale(rec, reg, share)
            loss = rec + reg
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad or not shard.active:
                loss.backward()
            shard.sync_grads(p for g in opt.param_groups for p in g['params'])
            opt.step()
            sched.step()
            hist[it, 0] = rec.detach()
            hist[it, 1] = reg.detach()
            if (it + 1) % check == 0 or it + 1 == iters:
                shard.reduce_history(hist, it + 1)
                if not bool(torch.isfinite(hist[max(0, it + 1 - check):it + 1]).all()):
                    raise NonFiniteLoss(f'{stage}: non-finite loss at iteration {it + 1}')
            if progress is not None and ((it + 1) % step == 0 or it + 1 == iters):
                progress(it + 1 - reported)
                reported = it + 1
    finally:
        for q in aq:
            q.set_qdrop(None)
            q.eval()
        if entry is not None:
            entry.set_stream_mask(None)
    return hist


def _qdrop_entry(unit):
    """The input quantizer that QDrop's stream mask goes to (``None``: the input is float)."""
    q = entry_quantizer(unit)
    if q is None:
        return None
    if not isinstance(q, LSQQuantizer):
        raise TypeError(f"unit {unit.name!r}: input_mix='qdrop' needs an LSQQuantizer (or a subclass) at the "
                        f'unit input, got {type(q).__name__}')
    return q


@contextlib.contextmanager
def prequantized_input(unit, data: UnitData, frozen_entry, input_mix, chunk=64):
    """Apply a unit's *frozen* input quantizer to its cached inputs once, not every step.

    When the previous unit learned this unit's input step (chained units), the quantizer
    is a fixed function during this unit's optimisation: in ``'quant'`` mode the cached
    inputs are quantized in place, chunk by chunk, and the quantizer is switched off
    until the unit is done. Same values as applying it per step (it is the same
    operation), minus a full pass over a batch of activations per iteration. The cache
    then holds quantized inputs; quantizing them again (the next unit's carry-forward
    runs the unit with its quantizer on) gives the same values.
    """
    if frozen_entry is None or input_mix != 'quant' or not frozen_entry.enabled:
        yield
        return
    with torch.no_grad():
        for cache in data.x_q:
            for start in range(0, len(cache), chunk):
                stop = min(len(cache), start + chunk)
                cache.write(start, frozen_entry(cache.read(start, stop)))
    frozen_entry.enabled = False
    try:
        yield
    finally:
        frozen_entry.enabled = True


def optimise_unit(unit, data: UnitData, cfg, seed, progress=None, out_quantizer=None, input_learned=False,
                  stage=None):
    """Reconstruct ``unit`` in place; returns the loss history (iters x 2) on the host.

    Joint mode (default) learns alpha and the steps together; ``two_stage`` learns alpha
    with activation quantization off, then the steps with hard rounding (the reference
    recipe uses ``act_lr=4e-4`` for that stage). ``stage`` runs one of the two alone
    (``'weights'`` / ``'steps'``: the passes of ``act_mode='two_pass'``, the reference's
    global order). Ends with hard rounding. See :func:`step_quantizers` for
    ``out_quantizer`` / ``input_learned``.
    """
    mode = stage or cfg['act_mode']
    if mode != 'steps':  # the steps pass keeps the rounding learned in the weights pass
        for layer in unit_layers(unit).values():
            q = layer.weight_quantizer
            if isinstance(q, AdaRoundQuantizer):
                q.set_rounding('soft', layer.weight)
    set_quant_state(unit.module, True, True)
    if out_quantizer is not None:
        out_quantizer.enabled = True
    aq_all = step_quantizers(unit, out_quantizer, input_learned)
    skip = entry_quantizer(unit) if input_learned else None
    if skip is not None:
        skip.scale.requires_grad_(False)
    torch.manual_seed(mask_seed(seed))  # QDrop masks (several processes: one seed per rank)
    if mode == 'joint':
        wq, aq, groups = _param_groups(unit, cfg, aq_all)
        with prequantized_input(unit, data, skip, cfg['input_mix']):
            hist = _run_stage(unit, data, cfg, cfg['iters'], groups, wq, aq, True, seed, progress, 'joint',
                              out_quantizer)
    else:
        hist = []
        if mode in ('two_stage', 'weights'):
            set_quant_state(unit.module, True, False)  # activations float
            if out_quantizer is not None:
                out_quantizer.enabled = False
            wq, aq, groups = _param_groups(unit, cfg, aq_all, with_steps=False)
            hist.append(_run_stage(unit, data, cfg, cfg['iters'], groups, wq, [], True, seed, progress, 'weights'))
            for q in wq:
                q.set_rounding('hard')
        if mode in ('two_stage', 'steps'):
            set_quant_state(unit.module, True, True)
            if out_quantizer is not None:
                out_quantizer.enabled = True
            _, aq, groups = _param_groups(unit, cfg, aq_all, with_alpha=False)
            with prequantized_input(unit, data, skip, cfg['input_mix']):
                hist.append(_run_stage(unit, data, cfg, cfg['act_iters'] or cfg['iters'], groups, [], aq, False,
                                       seed + 1, progress, 'steps', out_quantizer))
        hist = torch.cat(hist)
    freeze_unit(unit)
    if out_quantizer is not None:
        out_quantizer.scale.requires_grad_(False)
    broadcast_quantizers(unit.module, out_quantizer)  # several processes: rank 0's (equal) values
    return hist.cpu()


def freeze_unit(unit):
    """Hard rounding, no trainable quantization parameter left."""
    for q in quantizers_of(unit.module):
        if isinstance(q, AdaRoundQuantizer) and q.rounding == 'soft':
            q.set_rounding('hard')
        q.scale.requires_grad_(False)
