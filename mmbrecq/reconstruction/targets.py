"""What a unit is reconstructed against: its cached inputs, float output and Fisher weights.

One service for reconstruction and for the mixed-precision sensitivity, which both need
the same three things per unit:

* **inputs**: the unit's input in the quantized stream (earlier units quantized) and/or
  in the float stream, carried forward from the previous unit when the two are chained
  (:mod:`.capture`), else captured by a prefix run of the model;
* **target**: the unit's float output;
* **Fisher weights**: the gradient of the task loss w.r.t. the unit's output, turned into
  per-element weights (:func:`.objective.fisher_weight`).
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
from mmengine.utils import apply_to

from mmbrecq.modules import quantizers_of, set_quant_state
from mmbrecq.registry import TASK_LOSSES, build_from
from mmbrecq.utils.dist import global_sum

from .cache import CacheBudget, SampleCache
from .calibration import CalibrationSet
from .capture import run_capture
from .objective import fisher_weight


def build_task_loss(cfg, calib: CalibrationSet):
    """The task loss whose gradient gives the Fisher weights: ``cfg`` (``quant_cfg.recon.task_loss``)
    or, when ``None``, the calibration set's own (classifier KL, detector divergence)."""
    cfg = cfg or calib.task_loss
    if TASK_LOSSES.get(cfg.get('type')) is None:
        raise ValueError(f'quant_cfg.recon.task_loss.type={cfg.get("type")!r} is not a registered task '
                         f'loss; registered: {sorted(TASK_LOSSES.module_dict)}')
    return build_from(TASK_LOSSES, cfg)


@dataclass
class Carry:
    """What a unit leaves for the next one when the two are chained: the unit itself, its
    quantized-stream input caches and its float-output caches (the next unit's float input)."""
    unit: object
    x_q: Optional[List[SampleCache]]
    y_fp: List[SampleCache]

    def release(self, keep=None):
        """Free the caches the next unit did not adopt (``keep``: its float-input caches)."""
        for c in self.x_q or []:
            c.free()
        if self.y_fp is not keep:
            for c in self.y_fp:
                c.free()


class UnitTargets:
    """Captures, carries forward and weights the data of one unit after another.

    Args:
        model: the swapped model.
        calib: the calibration set.
        budget: where the caches go.
        task_loss: built task loss (``None``: no Fisher weights, plain MSE).
        fisher_mode: how gradients become weights (``quant_cfg.recon.fisher_weight``).
        always_quantized: quantizers outside every unit (a block's input quantizer in
            layer-wise mode): they quantize in every quantized-stream run, as they will in
            the final model.

    :attr:`act_quant` ``False`` makes the quantized stream weight-only (the weights pass of
    ``act_mode='two_pass'``: activations float everywhere, as in the reference's first pass).
    """

    def __init__(self, model, calib: CalibrationSet, budget: CacheBudget, task_loss, fisher_mode,
                 always_quantized=()):
        self.model, self.calib, self.budget = model, calib, budget
        self.task_loss, self.fisher_mode = task_loss, fisher_mode
        self.always_quantized = list(always_quantized)
        self.fp_outputs = None
        self.act_quant = True

    @classmethod
    def orphans(cls, model, units):
        """Quantizers of ``model`` that belong to no unit of ``units``."""
        inside = {id(q) for u in units for q in quantizers_of(u.module)}
        return [q for q in quantizers_of(model) if id(q) not in inside]

    def quantized_stream(self, units):
        """Model state of the quantized stream: ``units`` quantized, everything else float
        (except :attr:`always_quantized`)."""
        set_quant_state(self.model, False, False)
        for q in self.always_quantized:
            q.enabled = self.act_quant or q.role == 'weight'
        for u in units:
            set_quant_state(u.module, True, self.act_quant)

    @torch.no_grad()
    def compute_float_outputs(self):
        """The float model's outputs of every calibration batch, on the host (the task
        loss's reference); computed once per run."""
        set_quant_state(self.model, False, False)
        self.fp_outputs = [apply_to(self.calib.forward(self.model, b), lambda x: isinstance(x, torch.Tensor),
                                    lambda t: t.detach().cpu()) for b in self.calib.batches]
        return self.fp_outputs

    # -- caches ----------------------------------------------------------------------------
    def _alloc(self, shapes, rows, name):
        n = self.calib.num_samples
        return [self.budget.allocate((n, ) + s, name=f'{name}{k}', rows=r)
                for k, (s, r) in enumerate(zip(shapes, rows))]

    def _prefix_capture(self, unit, trace, caches_in, caches_out, quantized_before):
        """Fill caches from a model run stopped at the unit (float, or with earlier units quantized)."""
        if quantized_before is None:
            set_quant_state(self.model, False, False)
        else:
            self.quantized_stream(quantized_before)
        calib = self.calib

        def writer(caches, what):
            def write(b, k, t):
                cache = caches[k]
                rows = calib.sizes[b] * cache.rows
                if tuple(t.shape[1:]) != cache.row_shape or t.shape[0] != rows:
                    raise ValueError(f'unit {unit.name!r}: its {what} in calibration batch {b} has shape '
                                     f'{tuple(t.shape)}, expected {(rows, ) + cache.row_shape} as in batch 0; '
                                     'calibration images must share one size (quant_cfg.calib.pad_to) and '
                                     'two-stage detectors one number of proposals per image')
                cache.write(calib.offsets[b], t)
            return write if caches else None

        run_capture(self.model, unit, calib, trace.calls, writer(caches_in, 'input'), writer(caches_out, 'output'),
                    need_output=caches_out is not None)

    @torch.no_grad()
    def _carry(self, unit, src, dst, quantized):
        """``dst = unit(src)`` chunk by chunk along the calibration batches' boundaries."""
        set_quant_state(unit.module, quantized, quantized and self.act_quant)
        for k in range(len(src)):
            for start, stop in self.calib.chunks():
                dst[k].write(start, unit.forward(src[k].read(start, stop)))

    def inputs_and_target(self, unit, trace, input_mix, carry: Optional[Carry], done_units):
        """``(x_q, x_fp, y_fp)`` caches of ``unit``: quantized-stream input (``'quant'`` /
        ``'qdrop'``), float input (``'fp'`` / ``'qdrop'``; for a chained unit, the previous
        unit's float output) and float output. Chained units are carried forward from
        ``carry``; the others captured by prefix runs (``done_units`` quantized)."""
        need_q, need_fp = input_mix in ('quant', 'qdrop'), input_mix in ('fp', 'qdrop')
        chained = carry is not None and trace.chained
        x_q = self._alloc(trace.in_shapes, trace.in_rows, 'x_q') if need_q else None
        if chained:
            x_fp = carry.y_fp
            if need_q:
                self._carry(carry.unit, carry.x_q, x_q, quantized=True)
        else:  # the float input is only kept when the optimisation reads it
            x_fp = self._alloc(trace.in_shapes, trace.in_rows, 'x_fp') if need_fp else None
            if need_q:
                self._prefix_capture(unit, trace, x_q, None, done_units)
        y_fp = self._alloc(trace.out_shapes, trace.out_rows, 'y_fp')
        if chained:
            self._carry(unit, x_fp, y_fp, quantized=False)
        else:
            self._prefix_capture(unit, trace, x_fp, y_fp, None)
        return x_q, x_fp, y_fp

    def float_io(self, unit, trace):
        """``(x_fp, y_fp)``: the unit's float input and output caches (prefix run)."""
        x_fp = self._alloc(trace.in_shapes, trace.in_rows, 'x_fp')
        y_fp = self._alloc(trace.out_shapes, trace.out_rows, 'y_fp')
        self._prefix_capture(unit, trace, x_fp, y_fp, None)
        return x_fp, y_fp

    # -- Fisher ------------------------------------------------------------------------------
    def fisher(self, unit, trace, quantized_units):
        """Fisher weights of the unit's output: the gradient of the task loss w.r.t. it, with
        ``quantized_units`` quantized (reconstruction: the units up to this one), turned into
        weights in place chunk by chunk."""
        if self.fp_outputs is None:
            self.compute_float_outputs()
        self.quantized_stream(quantized_units)
        grads = self._alloc(trace.out_shapes, trace.out_rows, 'fisher')
        for b, batch in enumerate(self.calib.batches):
            for k, g in enumerate(self._output_grads(unit, b, batch)):
                grads[k].write(self.calib.offsets[b], g)
        mode, calib = self.fisher_mode, self.calib
        for cache in grads:
            mean_sq = 0.0
            if mode == 'normalized':
                mean_sq = sum(float(cache.read(s, e).pow(2).sum()) for s, e in calib.chunks())
                mean_sq, count = global_sum(mean_sq, cache.data.numel())  # over the ranks' shards
                mean_sq /= max(1, count)
            for s, e in calib.chunks():
                cache.write(s, fisher_weight(cache.read(s, e), mode, mean_sq))
        return grads

    def _output_grads(self, unit, b, batch):
        """Gradients of the task loss w.r.t. each call's output of ``unit`` on batch ``b``."""
        leaves = []

        def detach_output(module, args, out):
            leaf = out.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf.clone()  # what follows may work in place (ReLU(inplace=True))

        h = unit.exit.register_forward_hook(detach_output)
        try:
            with torch.enable_grad():
                out = self.calib.forward(self.model, batch)
                ref = apply_to(self.fp_outputs[b], lambda x: isinstance(x, torch.Tensor),
                               lambda t: t.to(self.budget.device, non_blocking=True))
                gs = torch.autograd.grad(self.task_loss(out, ref), leaves, allow_unused=True)
        finally:
            h.remove()
        return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, gs)]
