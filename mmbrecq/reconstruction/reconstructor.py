"""BRECQ reconstruction, unit after unit, with resume: the public ``reconstruct`` API.

:class:`BlockReconstructor` is the orchestration only: per unit, get its data
(:class:`.targets.UnitTargets`), optimise (:func:`.optimize.optimise_unit`), freeze, save a
resume point, and tell the hooks. Events go one way: ``emit(event, **kwargs)``, which in a
PTQ run is the runner's ``call_hook`` (``before_recon_unit`` / ``after_recon_unit``) and in
a stand-alone :func:`reconstruct` a call of the same methods on the given hooks.
"""
import copy
import os
import os.path as osp
import time

import torch
from mmengine.dist import is_main_process
from mmengine.logging import MMLogger, print_log
from mmengine.utils import ProgressBar

from mmbrecq.config import recon_config
from mmbrecq.modules import quantizers_of, set_quant_state
from mmbrecq.registry import RECONSTRUCTORS, build_from
from mmbrecq.utils import CheckpointError, atomic_save, load_checkpoint_file
from mmbrecq.utils.dist import main_then_barrier

from .cache import CacheBudget
from .calibration import CalibrationSet, calibrate_activations
from .capture import probe_units
from .optimize import NonFiniteLoss, optimise_unit
from .plot import ReconLossPlotHook
from .targets import Carry, UnitTargets, build_task_loss
from .units import UnitData, entry_quantizer, find_units, layer_units

STATE_FILE = 'recon_state.pth'


def hook_caller(hooks, runner=None):
    """``emit(event, **kwargs)`` that calls ``hook.<event>(runner, **kwargs)`` on every hook
    that has that method: the runner's ``call_hook`` convention, without a runner."""
    hooks = list(hooks or [])

    def emit(event, **kwargs):
        for h in hooks:
            fn = getattr(h, event, None)
            if fn is not None:
                fn(runner, **kwargs)
    return emit


@RECONSTRUCTORS.register_module()
class BlockReconstructor:
    """Reconstructs a quantized model unit by unit (BRECQ), or layer by layer (AdaRound).

    Per unit: capture its inputs (quantized / float stream) and float output target,
    compute the Fisher weights, optimise rounding and activation steps, freeze, save a
    resume point. See ``quant_cfg.recon`` in :mod:`mmbrecq.config` for every option.
    """

    def __init__(self, **cfg):
        self.cfg = recon_config(cfg)

    def units_of(self, qmodel):
        units = layer_units(qmodel) if self.cfg['granularity'] == 'layer' else find_units(qmodel)
        if not units:
            raise ValueError('the model has no reconstruction unit: was it passed through quantize_model?')
        return units

    def targets(self, qmodel, calib, budget, units):
        """The :class:`UnitTargets` service of a run over ``units``."""
        cfg = self.cfg
        task_loss = build_task_loss(cfg['task_loss'], calib) if cfg['loss'] == 'fisher_diag' else None
        return UnitTargets(qmodel, calib, budget, task_loss, cfg['fisher_weight'],
                           always_quantized=UnitTargets.orphans(qmodel, units))

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
        unknown = [n for n in state['done'] if n.rpartition(':')[2] not in names]
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
    def __call__(self, qmodel, calib: CalibrationSet, work_dir=None, resume=False, logger=None, emit=None):
        cfg = self.cfg
        logger = logger or MMLogger.get_current_instance()
        emit = emit or hook_caller(())
        device = next(qmodel.parameters()).device
        if work_dir:
            os.makedirs(work_dir, exist_ok=True)
        budget = CacheBudget(device, **{'disk_dir': work_dir, **cfg['cache']})
        units, traces = probe_units(qmodel, self.units_of(qmodel), calib)
        targets = self.targets(qmodel, calib, budget, units)
        done, records = ([], [])
        if resume and work_dir:
            done, records = self._load_state(qmodel, work_dir, units, logger)

        quant_params = {id(p) for q in quantizers_of(qmodel) for p in q.parameters()}
        requires_grad = {p: p.requires_grad for p in qmodel.parameters() if id(p) not in quant_params}
        for p in qmodel.parameters():  # only what a unit's optimiser selects will train
            p.requires_grad_(False)
        bar = None
        try:
            if any(not q.initialized for q in quantizers_of(qmodel, 'act')):
                set_quant_state(qmodel, True, True)
                calibrate_activations(qmodel, calib.batches[:1], calib.forward)
            if targets.task_loss is not None:
                targets.compute_float_outputs()
            passes = PASSES[cfg['act_mode']]
            todo = sum(_stage_iters(cfg, p) for p in passes for u in units if _key(p, u) not in done)
            bar = ProgressBar(todo) if cfg['progress'] and todo and is_main_process() else None
            for stage in passes:
                self._pass(qmodel, stage, units, traces, targets, done, records, work_dir, bar, logger, emit)
        finally:
            budget.free_all()  # also on errors: no memmap left behind in the work dir
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        set_quant_state(qmodel, True, True)
        if bar is not None:
            print()
        return records

    def _pass(self, qmodel, stage, units, traces, targets, done, records, work_dir, bar, logger, emit):
        """One pass over the units: every stage of each unit in turn (``stage=None``), or one
        stage of all units (``act_mode='two_pass'``: the weights pass with activations float
        everywhere, then the steps pass, the reference code's global order)."""
        targets.act_quant = stage != 'weights'
        if stage == 'steps' and not any(_key(stage, u) in done for u in units):
            _recalibrate_activations(qmodel, targets.calib)  # ranges of the weight-quantized model
        carry = None
        done_units = [u for u in units if _key(stage, u) in done]
        for i, unit in enumerate(units):
            if _key(stage, unit) in done:
                continue
            nxt = units[i + 1] if i + 1 < len(units) and traces[units[i + 1].name].chained else None
            emit('before_recon_unit', index=i, unit=unit)
            record, carry = self._reconstruct_unit(targets, i, unit, traces[unit.name], carry, done_units,
                                                   bar, logger, nxt if stage != 'weights' else None, stage)
            records.append(record)
            done.append(_key(stage, unit))
            done_units.append(unit)
            if work_dir:
                self._save_state(qmodel, work_dir, done, records)
            emit('after_recon_unit', index=i, unit=unit, record=record, records=records)
        if carry is not None:  # the last unit's caches: nothing reads them after this pass
            carry.release()

    def _optimise(self, unit, data, trace, i, bar, out_q, logger, calib, stage=None):
        """Optimise ``unit``; on a non-finite loss restore it (and ``out_q``) and fail or fall
        back to nearest rounding (``quant_cfg.recon.on_nan``). Returns (status, history)."""
        cfg = self.cfg
        snapshot = copy.deepcopy((unit.module.state_dict(), out_q.state_dict() if out_q else None))
        try:
            return 'ok', optimise_unit(unit, data, cfg, cfg['seed'] + i, bar.update if bar else None,
                                       out_quantizer=out_q, input_learned=trace.chained and i > 0, stage=stage)
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
            return 'nearest_fallback', torch.zeros(0, 2)

    def _reconstruct_unit(self, targets: UnitTargets, i, unit, trace, carry, done_units, bar, logger,
                          next_unit=None, stage=None):
        """One unit: data, optimisation, freeing; returns its record and what the next unit
        may carry forward."""
        cfg = self.cfg
        t0 = time.perf_counter()
        x_q, x_fp, y_fp = targets.inputs_and_target(unit, trace, cfg['input_mix'], carry, done_units)
        if carry is not None:  # the previous unit's caches are consumed now
            carry.release(keep=x_fp)
        t1 = time.perf_counter()
        weights = targets.fisher(unit, trace, done_units + [unit]) if targets.task_loss is not None else None
        t2 = time.perf_counter()
        data = UnitData(x_q, x_fp if cfg['input_mix'] != 'quant' else None, y_fp, weights)
        where = data.describe()
        targets.quantized_stream(done_units)
        status, hist = self._optimise(unit, data, trace, i, bar,
                                      entry_quantizer(next_unit) if next_unit is not None else None, logger,
                                      targets.calib, stage)
        set_quant_state(unit.module, True, True)
        t3 = time.perf_counter()
        for c in (weights or []) + (x_fp or []):
            c.free()  # keep what the next unit may carry forward (x_q, y_fp)
        rec = hist[:, 0]
        record = dict(
            name=unit.name, kind=unit.label, stage=stage, calls=trace.calls, cache=where, status=status,
            chained=trace.chained, loss_start=float(rec[0]) if len(rec) else None,
            loss_end=float(rec[-50:].mean()) if len(rec) else None,
            round_end=float(hist[-1, 1]) if len(hist) else None,
            capture_s=t1 - t0, fisher_s=t2 - t1, optim_s=t3 - t2,
            history=hist[::max(1, len(hist) // 500)].tolist())
        print_log(
            f'[{i + 1}{"" if stage is None else " " + stage}] {unit.name} ({unit.label}, '
            f'{trace.calls} call{"s" * (trace.calls > 1)}'
            f'{", chained" if trace.chained else ""}) cache {where} | rec loss '
            f'{record["loss_start"] or 0:.4g} -> {record["loss_end"] or 0:.4g}, round {record["round_end"] or 0:.4g}'
            f' | capture {t1 - t0:.1f}s fisher {t2 - t1:.1f}s optim {t3 - t2:.1f}s | {status}', logger)
        return record, Carry(unit, x_q, y_fp)


#: act_mode -> the passes over the units (None: every stage of a unit before the next unit)
PASSES = dict(joint=[None], two_stage=[None], two_pass=['weights', 'steps'])


def _stage_iters(cfg, stage):
    """Optimisation steps of one unit in a pass (``None``: all its stages)."""
    steps = cfg['act_iters'] or cfg['iters']
    if stage is None:
        return cfg['iters'] + (steps if cfg['act_mode'] == 'two_stage' else 0)
    return cfg['iters'] if stage == 'weights' else steps


def _key(stage, unit):
    """A unit's entry in the resume state's ``done`` list (``'steps:layer1.0'`` in the second pass)."""
    return unit.name if stage is None else f'{stage}:{unit.name}'


def _recalibrate_activations(qmodel, calib):
    """The reference's activation init after its weights pass: the Lp range search again, on
    the quantized stream with the learned rounding upstream, as the reference does (a folded
    reparameterised quantizer searches its per-tensor range again)."""
    for q in quantizers_of(qmodel, 'act'):
        q.reset_range()
    set_quant_state(qmodel, True, True)
    calibrate_activations(qmodel, calib.batches[:1], calib.forward, stream='quantized')


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
                hooks=(), plot=True, runner=None):
    """Reconstruct a quantized model (from :func:`mmbrecq.quantize_model`) in place.

    Args:
        qmodel: the swapped model.
        calib: a :class:`CalibrationSet`, or a list/iterable of batches (then ``forward``
            says how to run one; default ``model(batch)``).
        recon_cfg: ``quant_cfg.recon`` (dict).
        work_dir: where the resume state (and disk caches) go; ``None``: no resume point.
        resume: continue after the last unit saved in ``work_dir``.
        hooks: objects with optional ``before_recon_unit(runner, index, unit)`` /
            ``after_recon_unit(runner, index, unit, record, records)`` methods (mmengine
            hooks), called with ``runner=None``.
        plot: redraw ``work_dir/recon_losses.png`` after every unit (a :class:`ReconLossPlotHook`).
        runner: in a PTQ run, the mmengine runner: events go to its ``call_hook`` (its own
            hooks, the loss plot among them) and ``hooks`` / ``plot`` are not used.
    Returns:
        one record per unit (losses, times, cache placement, status).
    """
    if not isinstance(calib, CalibrationSet):
        calib = CalibrationSet(calib, forward)
    cfg = dict(recon_cfg or {})
    cfg.setdefault('type', 'BlockReconstructor')
    if RECONSTRUCTORS.get(cfg['type']) is None:
        raise ValueError(f'quant_cfg.recon.type={cfg["type"]!r} is not a registered reconstructor; '
                         f'registered: {sorted(RECONSTRUCTORS.module_dict)}')
    reconstructor = build_from(RECONSTRUCTORS, cfg)
    if runner is not None:
        emit = runner.call_hook
    else:
        hooks = list(hooks) + ([ReconLossPlotHook(out_dir=work_dir)] if work_dir and plot else [])
        emit = hook_caller(hooks)
    return reconstructor(qmodel, calib, work_dir=work_dir, resume=resume, logger=logger, emit=emit)
