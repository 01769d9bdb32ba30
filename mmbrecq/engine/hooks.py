"""The hook that writes a PTQ run's results: quantized checkpoint + summary.

An ordinary mmengine hook reacting to the PTQ loop's ``after_ptq`` event, added by
``tools/ptq.py`` unless the config already lists it in ``custom_hooks`` (as is the
loss-curve hook, :class:`mmbrecq.reconstruction.ReconLossPlotHook`, which lives with the
reconstruction it draws).
"""
import os.path as osp
from collections import Counter

from mmengine.dist import master_only
from mmengine.hooks import Hook

from mmbrecq.modules import QuantConfig
from mmbrecq.reconstruction import find_units
from mmbrecq.registry import HOOKS
from mmbrecq.utils import atomic_json_dump

from .quant_checkpoint import save_quantized


@HOOKS.register_module()
class QuantCheckpointHook(Hook):
    """Writes ``quantized.pth`` and ``summary.json`` (metrics, bits, times, what was loaded, unit
    kinds) when PTQ ends, each all or nothing.

    ``unit_kinds`` counts the reconstruction units per kind (``BasicBlock``,
    ``InvertedResidualSE``, ``Conv2d`` for a single layer, ...): a model whose blocks no
    rule covers shows only layer kinds there."""

    priority = 'LOW'

    def __init__(self, filename='quantized.pth', summary='summary.json'):
        self.filename, self.summary = filename, summary

    @master_only
    def after_ptq(self, runner, model, results):
        qcfg = runner.cfg.quant_cfg
        path = save_quantized(model, osp.join(runner.work_dir, self.filename), qcfg,
                              extra_meta=dict(config=osp.basename(runner.cfg.filename or '')))
        parsed = QuantConfig(qcfg)  # the defaults live in one place
        w_bits = 'mixed' if results.get('mixed_precision') else parsed.w_bits  # bit map: results['mixed_precision']
        unit_kinds = dict(Counter(u.kind for u in find_units(model)))
        summary = dict(config=runner.cfg.filename, w_bits=w_bits, a_bits=parsed.a_bits,
                       keep_8bit=parsed.keep_8bit, checkpoint=path, unit_kinds=unit_kinds, **results)
        atomic_json_dump(summary, osp.join(runner.work_dir, self.summary), indent=2, default=str)
        runner.logger.info(f'quantized checkpoint: {path}; summary: {osp.join(runner.work_dir, self.summary)}')
