"""Calibration data and the activation ranges initialised from it.

:class:`CalibrationSet` holds the preprocessed calibration batches and how to run the
model on one (every reconstruction stage reads it); :func:`calibrate_activations` sets
the activation quantizers' ranges from them. How the batches are drawn from a config's
dataloader is the engine's job (:mod:`mmbrecq.engine.calibration`).
"""
import torch
from torch import nn

from mmbrecq.modules import quantizers_of
from mmbrecq.modules.quant_attention import QuantMatmulMixin
from mmbrecq.modules.reparam import fold_post_ln_scales, plan_post_ln_folds
from mmbrecq.utils.batch import batch_size
from mmbrecq.utils.dist import ShardReducer


class CalibrationSet:
    """Calibration batches (already preprocessed) and how to run the model on one.

    Args:
        batches: a list of batches; a batch is whatever ``forward(model, batch)`` takes.
        forward: ``forward(model, batch) -> output`` in the model's raw-tensor mode
            (default: ``model(batch)``; the PTQ loop passes mmengine's
            ``model(**batch, mode='tensor')``).
        task_loss: the ``TASK_LOSSES`` config whose gradient gives the Fisher weights when
            ``quant_cfg.recon.task_loss`` is not set: it must understand what ``forward``
            returns (default: ``ClassificationKL`` on logits).
    """

    def __init__(self, batches, forward=None, task_loss=None):
        self.batches = list(batches)
        self.task_loss = dict(task_loss or dict(type='ClassificationKL'))
        if not self.batches:
            raise ValueError('the calibration set is empty')
        self.forward = forward or (lambda model, batch: model(batch))
        self.sizes = [batch_size(b) for b in self.batches]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_samples = sum(self.sizes)

    def __iter__(self):
        return iter(self.batches)

    def chunks(self):
        """``(start, stop)`` sample ranges of the batches, for chunked carry-forward."""
        return [(o, o + s) for o, s in zip(self.offsets, self.sizes)]


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches, forward=None, stream='auto'):
    """Initialise every activation quantizer's range from calibration batches.

    ``stream`` (``quant_cfg.calib.act_stream``), measured in the README's ablations:

    - ``'float'``: every range from the float model's activations (weights and upstream
      activations unquantized), as the QDrop code does. Better on the CNNs (ResNets,
      MobileNetV3): at low bits, nearest-rounded weights upstream distort what a range
      would be fitted to, and reconstruction then has to undo it.
    - ``'quantized'``: quantizers initialise on the first batch that reaches them, in
      execution order, so each one sees inputs already quantized upstream (weights at
      nearest rounding). Better on the transformers (the digits ViT).
    - ``'auto'`` (default): ``'quantized'`` for a model with quantized attention, else
      ``'float'``.

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    if stream not in ('auto', 'quantized', 'float'):
        raise ValueError(f"stream={stream!r}: expected 'auto', 'quantized' or 'float' (quant_cfg.calib.act_stream)")
    if stream == 'auto':
        stream = 'quantized' if any(isinstance(m, QuantMatmulMixin) for m in model.modules()) else 'float'
    plan_post_ln_folds(model)  # pairs folded without a shift calibrate shift-free grids
    acts = [q for q in quantizers_of(model, 'act') if q.enabled and not q.initialized]
    # the float stream: every other quantizer (weights, ranges already set) off meanwhile
    others = [q for q in quantizers_of(model) if q.enabled and all(q is not a for a in acts)] \
        if stream == 'float' else []
    try:
        for q in others:
            q.enabled = False
        for batch in batches:
            reducer = ShardReducer.for_batch(batch)  # several processes: ranges of the global batch
            for q in acts:
                q.start_observing(reducer, passthrough=stream == 'float')
            forward(model, batch) if forward is not None else model(batch)
            if all(q.initialized for q in acts):
                break
    finally:
        for q in acts:
            q.stop_observing()
        for q in others:
            q.enabled = True
    missing = [n for n, m in model.named_modules() if m in acts and not m.initialized]
    if missing:
        raise RuntimeError(f'activation quantizers never reached by the calibration data: {missing[:5]}')
    fold_post_ln_scales(model)  # post-LayerNorm per-channel scales -> LayerNorm and next Linear
    return model
