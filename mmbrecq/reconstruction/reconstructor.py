"""BRECQ reconstruction, unit after unit, with resume: the public ``reconstruct`` API."""
import copy
import os
import os.path as osp
import time

import torch
from mmengine.logging import MMLogger, print_log
from mmengine.utils import ProgressBar

from mmbrecq.modules.swap import (Unit, calibrate_activations, find_units, quantizers_of,
                                  set_quant_state)
from mmbrecq.modules.quant_layers import QuantLayerMixin
from mmbrecq.registry import RECONSTRUCTORS, TASK_LOSSES, build_from
from mmbrecq.utils import CheckpointError, atomic_save, load_checkpoint_file
from mmbrecq.utils.dist import global_sum, is_main, main_then_barrier
from .cache import CacheBudget
from .capture import CalibrationSet, probe_units, run_capture
from .config import recon_config
from .objective import fisher_weight
from .optimize import NonFiniteLoss, UnitData, entry_quantizer, optimise_unit
from .plot import plot_losses

STATE_FILE = 'recon_state.pth'


def _to_host(out):
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if isinstance(out, (list, tuple)):
        return type(out)(_to_host(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_host(v) for k, v in out.items()}
    return out


def _to_device(out, device):
    if isinstance(out, torch.Tensor):
        return out.to(device, non_blocking=True)
    if isinstance(out, (list, tuple)):
        return type(out)(_to_device(o, device) for o in out)
    if isinstance(out, dict):
        return {k: _to_device(v, device) for k, v in out.items()}
    return out


class _Callbacks:
    """Fan-out to observers with optional ``before_unit`` / ``after_unit`` methods."""

    def __init__(self, observers):
        self.observers = list(observers or [])

    def __call__(self, event, **kwargs):
        for o in self.observers:
            fn = getattr(o, event, None)
            if fn is not None:
                fn(**kwargs)


class _LossPlot:
    """Redraws the loss curves after every unit (the runner uses ReconLossPlotHook instead)."""

    def __init__(self, path):
        self.path = path

    @main_then_barrier
    def after_unit(self, index, unit, record, records):
        plot_losses(records, self.path)


@RECONSTRUCTORS.register_module()
class BlockReconstructor:
    """Reconstructs a quantized model unit by unit (BRECQ), or layer by layer (AdaRound).

    Per unit: capture its inputs (quantized / float stream) and float output target,
    compute the Fisher weights, optimise rounding and activation steps, freeze, save a
    resume point. See ``config.DEFAULT_RECON`` for every option.
    """

    def __init__(self, **cfg):
        cfg.pop('type', None)
        self.cfg = recon_config(cfg)
        self._orphans = []  # quantizers outside every unit; set per run
        self.task_loss = None  # built per run: its default comes from the calibration set

    def _build_task_loss(self, calib):
        if self.cfg['loss'] != 'fisher_diag':
            return None
        cfg = self.cfg['task_loss'] or calib.task_loss
        if TASK_LOSSES.get(cfg.get('type')) is None:
            raise ValueError(f'quant_cfg.recon.task_loss.type={cfg.get("type")!r} is not a registered task '
                             f'loss; registered: {sorted(TASK_LOSSES.module_dict)}')
        return build_from(TASK_LOSSES, cfg)

    # -- units ---------------------------------------------------------------------------
    def units_of(self, qmodel):
        units = find_units(qmodel)
        if self.cfg['granularity'] == 'layer':
            units = [Unit(n, m, type(m).__name__) for n, m in qmodel.named_modules()
                     if isinstance(m, QuantLayerMixin)]
        if not units:
            raise ValueError('the model has no reconstruction unit: was it passed through quantize_model?')
        return units

    def _quantized_stream(self, qmodel, units):
        """Model state of the quantized stream: ``units`` quantized, everything else float,
        except quantizers that belong to no unit (a block's input quantizer in layer-wise
        mode), which always quantize, as they will in the final model."""
        set_quant_state(qmodel, False, False)
        for q in self._orphans:
            q.enabled = True
        for u in units:
            set_quant_state(u.module, True, True)

    # -- capture -------------------------------------------------------------------------
    def _alloc(self, budget, calib, shapes, name, rows):
        return [budget.allocate((calib.num_samples, ) + s, name=f'{name}{k}', rows=r)
                for k, (s, r) in enumerate(zip(shapes, rows))]

    def _prefix_capture(self, qmodel, unit, trace, calib, caches_in, caches_out, quantized_before):
        """Fill caches from a model run stopped at the unit (float, or with earlier units quantized)."""
        if quantized_before is None:
            set_quant_state(qmodel, False, False)
        else:
            self._quantized_stream(qmodel, quantized_before)

        def check(cache, t, what, b):
            rows = calib.sizes[b] * cache.rows
            if tuple(t.shape[1:]) != cache.row_shape or t.shape[0] != rows:
                raise ValueError(f'unit {unit.name!r}: its {what} in calibration batch {b} has shape '
                                 f'{tuple(t.shape)}, expected {(rows, ) + cache.row_shape} as in batch 0; '
                                 'calibration images must share one size (quant_cfg.calib.pad_to) and '
                                 'two-stage detectors one number of proposals per image')

        def on_input(b, k, x):
            check(caches_in[k], x, 'input', b)
            caches_in[k].write(calib.offsets[b], x)

        def on_output(b, k, y):
            check(caches_out[k], y, 'output', b)
            caches_out[k].write(calib.offsets[b], y)

        run_capture(qmodel, unit, calib, trace.calls, on_input if caches_in else None,
                    on_output if caches_out else None, need_output=caches_out is not None)

    @torch.no_grad()
    def _carry(self, unit, src, dst, calib, quantized):
        """``dst = unit(src)`` chunk by chunk along the calibration batches' boundaries."""
        set_quant_state(unit.module, quantized, quantized)
        for k in range(len(src)):
            for start, stop in calib.chunks():
                dst[k].write(start, unit.forward(src[k].read(start, stop)))

    def _capture(self, qmodel, unit, trace, calib, budget, carry, done_units):
        mix = self.cfg['input_mix']
        need_q, need_fp = mix in ('quant', 'qdrop'), mix in ('fp', 'qdrop')
        chained = carry is not None and trace.chained
        x_q = self._alloc(budget, calib, trace.in_shapes, 'x_q', trace.in_rows) if need_q else None
        if chained:
            x_fp = carry['y_fp']
            if need_q:
                self._carry(carry['unit'], carry['x_q'], x_q, calib, quantized=True)
        else:  # the float input is only kept when the optimisation reads it
            x_fp = self._alloc(budget, calib, trace.in_shapes, 'x_fp', trace.in_rows) if need_fp else None
            if need_q:
                self._prefix_capture(qmodel, unit, trace, calib, x_q, None, done_units)
        y_fp = self._alloc(budget, calib, trace.out_shapes, 'y_fp', trace.out_rows)
        if chained:
            self._carry(unit, x_fp, y_fp, calib, quantized=False)
        else:
            self._prefix_capture(qmodel, unit, trace, calib, x_fp, y_fp, None)
        return x_q, x_fp, y_fp

    # -- Fisher ---------------------------------------------------------------------------
    def _fisher(self, qmodel, unit, trace, calib, budget, fp_outputs, done_units):
        """Gradient of the task loss w.r.t. the unit's output, model quantized up to the unit."""
        self._quantized_stream(qmodel, done_units + [unit])
        grads = self._alloc(budget, calib, trace.out_shapes, 'fisher', trace.out_rows)
        device = budget.device
        for b, batch in enumerate(calib.batches):
            leaves = []

            def detach_output(module, args, out):
                leaf = out.detach().requires_grad_(True)
                leaves.append(leaf)
                return leaf.clone()  # what follows may work in place (ReLU(inplace=True))

            h = unit.exit.register_forward_hook(detach_output)
            try:
                with torch.enable_grad():
                    out = calib.forward(qmodel, batch)
                    loss = self.task_loss(out, _to_device(fp_outputs[b], device))
                    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
            finally:
                h.remove()
            for k, g in enumerate(gs):
                grads[k].write(calib.offsets[b], torch.zeros_like(leaves[k]) if g is None else g)
        mode = self.cfg['fisher_weight']
        for cache in grads:  # turn gradients into weights in place, chunk by chunk
            mean_sq = 0.0
            if mode == 'normalized':
                mean_sq = sum(float(cache.read(s, e).pow(2).sum()) for s, e in calib.chunks())
                mean_sq, count = global_sum(mean_sq, cache.data.numel())  # over the ranks' shards
                mean_sq /= max(1, count)
            for s, e in calib.chunks():
                cache.write(s, fisher_weight(cache.read(s, e), mode, mean_sq))
        return grads

    def float_targets(self, qmodel, unit, trace, calib, budget, fp_outputs, done_units):
        """``(x_fp, y_fp, fisher)``: the unit's float input and output caches and its Fisher
        weights (model quantized up to the unit), as reconstruction computes them; the
        caller frees them. The mixed-precision sensitivity measures every unit this way."""
        if self.task_loss is None:
            self.task_loss = self._build_task_loss(calib)
        x_fp = self._alloc(budget, calib, trace.in_shapes, 'x_fp', trace.in_rows)
        y_fp = self._alloc(budget, calib, trace.out_shapes, 'y_fp', trace.out_rows)
        self._prefix_capture(qmodel, unit, trace, calib, x_fp, y_fp, None)
        return x_fp, y_fp, self._fisher(qmodel, unit, trace, calib, budget, fp_outputs, done_units)

    # -- state ----------------------------------------------------------------------------
    @main_then_barrier
    def _save_state(self, qmodel, work_dir, done, records):
        atomic_save(dict(done=list(done), state_dict=qmodel.state_dict(), records=records),
                    osp.join(work_dir, STATE_FILE))

    def _load_state(self, qmodel, work_dir, units, logger):
        path = osp.join(work_dir, STATE_FILE)
        if not osp.isfile(path):
            print_log(f'resume: no {STATE_FILE} in {work_dir}, starting from the first unit', logger)
            return [], []
        state = load_checkpoint_file(path, what='resume state')
        fix = 'resume with the config and checkpoint the run was started with, or start without --resume'
        names = [u.name for u in units]
        unknown = [n for n in state['done'] if n not in names]
        if unknown:
            raise CheckpointError(f'{path} was written for another model: units {unknown[:3]} do not exist; {fix}')
        try:
            qmodel.load_state_dict(state['state_dict'])
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f'{path} does not fit this model and quant_cfg ({" ".join(str(e).split())[:400]}); '
                                  f'{fix}') from e
        print_log(f'resume: {len(state["done"])}/{len(units)} units already reconstructed ({path})', logger)
        return list(state['done']), list(state['records'])

    # -- main -----------------------------------------------------------------------------
    def __call__(self, qmodel, calib: CalibrationSet, work_dir=None, resume=False, logger=None,
                 callbacks=()):
        cfg = self.cfg
        logger = logger or MMLogger.get_current_instance()
        cb = _Callbacks(callbacks)
        device = next(qmodel.parameters()).device
        if work_dir:
            os.makedirs(work_dir, exist_ok=True)
        budget = CacheBudget(device, **{'disk_dir': work_dir, **cfg['cache']})
        self.task_loss = self._build_task_loss(calib)
        units, traces = probe_units(qmodel, self.units_of(qmodel), calib)
        in_units = {id(q) for u in units for q in quantizers_of(u.module)}
        self._orphans = [q for q in quantizers_of(qmodel) if id(q) not in in_units]
        done, records = ([], [])
        if resume and work_dir:
            done, records = self._load_state(qmodel, work_dir, units, logger)

        quant_params = {id(p) for q in quantizers_of(qmodel) for p in q.parameters()}
        requires_grad = {p: p.requires_grad for p in qmodel.parameters() if id(p) not in quant_params}
        for p in qmodel.parameters():  # only what a unit's optimiser selects will train
            p.requires_grad_(False)
        carry = None
        try:
            if any(not q.initialized for q in quantizers_of(qmodel, 'act')):
                set_quant_state(qmodel, True, True)
                calibrate_activations(qmodel, calib.batches[:1], calib.forward)
            fp_outputs = None
            if cfg['loss'] == 'fisher_diag':
                set_quant_state(qmodel, False, False)
                with torch.no_grad():
                    fp_outputs = [_to_host(calib.forward(qmodel, b)) for b in calib.batches]
            per_unit = cfg['iters'] + ((cfg['act_iters'] or cfg['iters']) if cfg['act_mode'] == 'two_stage' else 0)
            todo = [u for u in units if u.name not in done]
            bar = ProgressBar(len(todo) * per_unit) if cfg['progress'] and todo and is_main() else None
            done_units = [u for u in units if u.name in done]
            for i, unit in enumerate(units):
                if unit.name in done:
                    continue
                nxt = units[i + 1] if i + 1 < len(units) and traces[units[i + 1].name].chained else None
                records.append(self._reconstruct_unit(qmodel, i, unit, traces[unit.name], calib, budget,
                                                      carry, done_units, fp_outputs, bar, logger, cb, nxt))
                carry = records[-1].pop('_carry')
                done.append(unit.name)
                done_units.append(unit)
                if work_dir:
                    self._save_state(qmodel, work_dir, done, records)
                cb('after_unit', index=i, unit=unit, record=records[-1], records=records)
        finally:
            budget.free_all()  # also on errors: no memmap left behind in the work dir
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        set_quant_state(qmodel, True, True)
        if bar is not None:
            print()
        return records

    def _reconstruct_unit(self, qmodel, i, unit, trace, calib, budget, carry, done_units, fp_outputs,
                          bar, logger, cb, next_unit=None):
        cfg = self.cfg
        cb('before_unit', index=i, unit=unit)
        t0 = time.perf_counter()
        x_q, x_fp, y_fp = self._capture(qmodel, unit, trace, calib, budget, carry, done_units)
        if carry is not None:  # the previous unit's caches are consumed now
            for c in carry['x_q'] or []:
                c.free()
            if x_fp is not carry['y_fp']:
                for c in carry['y_fp']:
                    c.free()
        t1 = time.perf_counter()
        weights = (self._fisher(qmodel, unit, trace, calib, budget, fp_outputs, done_units)
                   if cfg['loss'] == 'fisher_diag' else None)
        t2 = time.perf_counter()
        data = UnitData(x_q, x_fp if cfg['input_mix'] != 'quant' else None, y_fp, weights)
        where = data.describe()
        self._quantized_stream(qmodel, done_units)
        out_q = entry_quantizer(next_unit) if next_unit is not None else None
        snapshot = copy.deepcopy((unit.module.state_dict(), out_q.state_dict() if out_q else None))
        status = 'ok'
        try:
            hist = optimise_unit(unit, data, cfg, cfg['seed'] + i, bar.update if bar else None,
                                 out_quantizer=out_q, input_learned=trace.chained and i > 0)
        except NonFiniteLoss as e:
            unit.module.load_state_dict(snapshot[0])
            if out_q is not None:
                out_q.load_state_dict(snapshot[1])
                out_q.scale.requires_grad_(False)
            msg = (f'unit {unit.name!r} ({unit.kind}): {e}{_nonfinite_origin(data, calib)}; its state was '
                   'restored to before the unit')
            if cfg['on_nan'] == 'fail':
                print_log(msg, logger, level=40)
                raise NonFiniteLoss(msg) from e
            print_log(msg + ' and it falls back to nearest rounding (quant_cfg.recon.on_nan)', logger, level=40)
            status, hist = 'nearest_fallback', torch.zeros(0, 2)
        set_quant_state(unit.module, True, True)
        t3 = time.perf_counter()
        for c in weights or []:
            c.free()
        # keep what the next unit may carry forward; free the rest
        keep = dict(unit=unit, x_q=x_q, y_fp=y_fp)
        if x_fp is not None:
            for c in x_fp:
                c.free()
        rec = hist[:, 0]
        kind = '+'.join([unit.kind] + [type(m).__name__ for m in unit.tail])  # e.g. Conv2d+ReLU+MaxPool2d
        record = dict(
            name=unit.name, kind=kind, calls=trace.calls, cache=where, status=status,
            chained=trace.chained, loss_start=float(rec[0]) if len(rec) else None,
            loss_end=float(rec[-50:].mean()) if len(rec) else None,
            round_end=float(hist[-1, 1]) if len(hist) else None,
            capture_s=t1 - t0, fisher_s=t2 - t1, optim_s=t3 - t2,
            history=hist[::max(1, len(hist) // 500)].tolist(), _carry=keep)
        print_log(
            f'[{i + 1}] {unit.name} ({kind}, {trace.calls} call{"s" * (trace.calls > 1)}'
            f'{", chained" if trace.chained else ""}) cache {where} | rec loss '
            f'{record["loss_start"] or 0:.4g} -> {record["loss_end"] or 0:.4g}, round {record["round_end"] or 0:.4g}'
            f' | capture {t1 - t0:.1f}s fisher {t2 - t1:.1f}s optim {t3 - t2:.1f}s | {status}', logger)
        return record


_ORIGIN = dict(  # which cache is not finite -> where the cause lies
    x_q='its quantized input is not finite (the cause is upstream of this unit)',
    x_fp='its float input is not finite (the float model upstream of this unit gives NaN/inf)',
    y_fp='its float output target is not finite (the float model up to this unit gives NaN/inf)',
    weight='its Fisher weights are not finite (the cause is downstream: the layers after this unit give NaN/inf)')


def _nonfinite_origin(data, calib):
    """``'; <where the NaN comes from>'`` when one of a unit's caches is not finite, else ``''``:
    a NaN downstream of a unit makes its Fisher weights, and so its loss, NaN first."""
    for key, text in _ORIGIN.items():
        caches = getattr(data, key) or []
        if any(not bool(torch.isfinite(c.read(s, e)).all()) for c in caches for s, e in calib.chunks()):
            return f'; {text}'
    return ''


def reconstruct(qmodel, calib, recon_cfg=None, forward=None, work_dir=None, resume=False, logger=None,
                callbacks=(), plot=True):
    """Reconstruct a quantized model (from :func:`mmbrecq.quantize_model`) in place.

    Args:
        qmodel: the swapped model.
        calib: a :class:`CalibrationSet`, or a list/iterable of batches (then ``forward``
            says how to run one; default ``model(batch)``).
        recon_cfg: ``quant_cfg.recon`` (dict); see ``config.DEFAULT_RECON``.
        work_dir: where the resume state (and disk caches) go; ``None``: no resume point.
        resume: continue after the last unit saved in ``work_dir``.
        callbacks: observers with optional ``before_unit(index, unit)`` /
            ``after_unit(index, unit, record, records)`` methods.
        plot: redraw ``work_dir/recon_losses.png`` after every unit (the PTQ loop leaves
            that to its ReconLossPlotHook).
    Returns:
        one record per unit (losses, times, cache placement, status).
    """
    if not isinstance(calib, CalibrationSet):
        calib = CalibrationSet(calib, forward)
    cfg = dict(recon_cfg or {})
    rtype = cfg.pop('type', 'BlockReconstructor')
    if RECONSTRUCTORS.get(rtype) is None:
        raise ValueError(f'quant_cfg.recon.type={rtype!r} is not a registered reconstructor; '
                         f'registered: {sorted(RECONSTRUCTORS.module_dict)}')
    reconstructor = build_from(RECONSTRUCTORS, dict(type=rtype, **cfg))
    callbacks = list(callbacks)
    if work_dir and plot:
        callbacks.append(_LossPlot(osp.join(work_dir, 'recon_losses.png')))
    return reconstructor(qmodel, calib, work_dir=work_dir, resume=resume, logger=logger, callbacks=callbacks)
