"""Getting a unit's inputs and float outputs out of a model, with hooks, without waste.

Three ways, cheapest first:

* **carry forward**: when a unit's input *is* the previous unit's output (consecutive
  ResNet blocks), its float input is the previous unit's float target (already cached)
  and its quantized input is the frozen previous unit applied to the previous quantized
  input. No prefix of the network runs again, so capture time stays proportional to the
  unit's own compute instead of growing with depth;
* **prefix run**: otherwise the model runs from the calibration batches and a hook
  raises :class:`StopForward` as soon as the unit has produced what is needed;
* **probe**: once per reconstruction, one float forward of one batch records the order
  in which units run, how often each is called per forward (shared heads run once per
  pyramid level), their shapes, and which units are chained.
"""
import logging

import torch
from mmengine.logging import print_log

from mmbrecq.modules import set_quant_state
from mmbrecq.utils.batch import batch_size

from .calibration import CalibrationSet
from .units import Unit, UnitTrace


class StopForward(Exception):
    """Raised by a capture hook once the unit it watches is done: the rest never runs."""


def _first_tensor(args, unit_name):
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError(f'unit {unit_name!r}: its first positional input is not a tensor; '
                        'register a block rule whose unit takes a tensor')
    return args[0]


def _rows_per_sample(t, n, unit_name, what):
    """A unit sees ``n`` samples, or ``n x rows`` rows (a RoI head: ``rows`` proposals per image)."""
    if t.dim() == 0 or t.shape[0] % n:
        raise ValueError(f'unit {unit_name!r}: its {what} has {t.shape[0] if t.dim() else 0} rows for a '
                         f'batch of {n} samples; a unit must see a fixed number of rows per sample '
                         '(two-stage detectors: fixed proposals per image, see quant_cfg.calib.num_proposals)')
    return t.shape[0] // n


def _runs_tail(unit, module_outs, exit_outs) -> bool:
    """Whether the model ran the unit's tail right after it, call for call."""
    ok = len(module_outs) == len(exit_outs)
    for x, y in zip(module_outs, exit_outs) if ok else ():
        for m in unit.tail:
            x = m(x)
        ok = ok and x.shape == y.shape and torch.equal(x, y)
    return ok


@torch.no_grad()
def probe_units(model, units, calib: CalibrationSet):
    """Run one float forward; return a :class:`UnitTrace` per unit, units sorted by execution."""
    traces = {u.name: UnitTrace() for u in units}
    ins, outs, values, order, handles = {}, {}, {}, [], []

    def make_hooks(unit):
        def pre(module, args):
            x = _first_tensor(args, unit.name)
            ins.setdefault(unit.name, []).append(x)
            if unit.name not in order:
                order.append(unit.name)

        def post(module, args, out):
            if not isinstance(out, torch.Tensor):
                raise TypeError(f'unit {unit.name!r} returns {type(out).__name__}, not a tensor')
            outs.setdefault(unit.name, []).append(out)
            values.setdefault(unit.name, []).append(out.detach().clone())
        return pre, post

    tail_in = {}  # a tail unit's own module output, to check that the model runs the tail
    for u in units:
        pre, post = make_hooks(u)
        handles.append(u.module.register_forward_pre_hook(pre, prepend=True))
        handles.append(u.exit.register_forward_hook(post))
        if u.tail:
            handles.append(u.module.register_forward_hook(
                lambda m, a, out, name=u.name: tail_in.setdefault(name, []).append(out.detach().clone())))
    set_quant_state(model, False, False)
    try:
        calib.forward(model, calib.batches[0])
    finally:
        for h in handles:
            h.remove()
    bad = [u for u in units if u.tail and u.name in order
           and not _runs_tail(u, tail_in.get(u.name, []), values.get(u.name, []))]
    if bad:  # a model whose forward differs from what the rule assumed: plain layer units
        print_log(f'units {[u.name for u in bad]}: the model does not run the tail that their block rule '
                  'names right after them; they are reconstructed without it', logger='current',
                  level=logging.WARNING)
        units = [Unit(u.name, u.module, u.kind) if u in bad else u for u in units]
        return probe_units(model, units, calib)
    never = [u.name for u in units if u.name not in order]
    if never:
        raise RuntimeError(f'units never executed by a forward pass: {never}; skip them in '
                           'quant_cfg.skip or check the model')
    _fill_traces(traces, order, ins, outs, values, batch_size(calib.batches[0]))
    ordered = sorted(units, key=lambda u: traces[u.name].order)
    return ordered, traces


def _fill_traces(traces, order, ins, outs, values, n):
    """Order, shapes, rows per sample and chaining of every unit the probe saw run."""
    for i, name in enumerate(order):
        t = traces[name]
        t.order = i
        t.in_shapes = [tuple(x.shape[1:]) for x in ins[name]]
        t.out_shapes = [tuple(y.shape[1:]) for y in outs[name]]
        t.in_rows = [_rows_per_sample(x, n, name, 'input') for x in ins[name]]
        t.out_rows = [_rows_per_sample(y, n, name, 'output') for y in outs[name]]
        if i > 0:
            # the same tensor object *and* unchanged values: an in-place op between the two
            # units (ReLU(inplace=True) after a conv unit) breaks the chain
            prev, prev_val = outs.get(order[i - 1], []), values.get(order[i - 1], [])
            t.chained = len(prev) == len(ins[name]) and all(
                a is b and torch.equal(a, v) for a, b, v in zip(ins[name], prev, prev_val))


def run_capture(model, unit, calib: CalibrationSet, calls, on_input=None, on_output=None,
                need_output=False):
    """Run the model batch by batch until ``unit`` has been called ``calls`` times.

    ``on_input(batch_idx, call, x)`` / ``on_output(batch_idx, call, y)`` receive the raw
    unit input (before any input quantizer of the unit) and its output.
    """
    state = {'call': 0, 'batch': 0}

    def pre(module, args):
        x = _first_tensor(args, unit.name)
        if on_input is not None:
            on_input(state['batch'], state['call'], x)
        if not need_output and state['call'] == calls - 1:
            raise StopForward

    def post(module, args, out):
        if on_output is not None:
            on_output(state['batch'], state['call'], out)
        state['call'] += 1
        if state['call'] == calls:
            raise StopForward

    h1 = unit.module.register_forward_pre_hook(pre, prepend=True)
    h2 = unit.exit.register_forward_hook(post)
    try:
        with torch.no_grad():
            for b, batch in enumerate(calib.batches):
                state['call'], state['batch'] = 0, b
                try:
                    calib.forward(model, batch)
                except StopForward:
                    pass
    finally:
        h1.remove()
        h2.remove()
