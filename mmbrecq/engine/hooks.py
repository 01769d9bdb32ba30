"""Hooks of a PTQ run: quantized checkpoint + summary, and loss-curve plots.

They are ordinary mmengine hooks reacting to the PTQ loop's stage events, added by
``tools/ptq.py`` unless the config already lists them in ``custom_hooks``.
"""
import json
import os.path as osp
from collections import Counter

from mmengine.hooks import Hook
from mmengine.dist import master_only

from mmbrecq.registry import HOOKS
from mmbrecq.modules import QuantConfig, find_units
from mmbrecq.reconstruction.plot import plot_losses
from .quant_checkpoint import save_quantized


@HOOKS.register_module()
class QuantCheckpointHook(Hook):
    """Writes ``quantized.pth`` and ``summary.json`` (metrics, bits, times, unit kinds) when PTQ ends.

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
        with open(osp.join(runner.work_dir, self.summary), 'w') as f:
            json.dump(summary, f, indent=2, default=str)
        runner.logger.info(f'quantized checkpoint: {path}; summary: {osp.join(runner.work_dir, self.summary)}')


@HOOKS.register_module()
class ReconLossPlotHook(Hook):
    """Redraws ``recon_losses.png`` (reconstruction and rounding loss per unit) after each unit."""

    priority = 'VERY_LOW'

    def __init__(self, filename='recon_losses.png'):
        self.filename = filename

    @master_only
    def after_recon_unit(self, runner, index, unit, record, records):
        plot_losses(records, osp.join(runner.work_dir, self.filename))
