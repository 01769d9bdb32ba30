"""Task losses whose gradient at a unit's output gives the Fisher-diagonal weights.

BRECQ weights a unit's output error by the squared gradient of the task loss w.r.t.
that output. Without labels the task loss is the divergence between the float and the
quantized model's raw outputs; each task defines what "raw outputs" are. Losses are
summed over the batch so that the gradient of one sample does not depend on how many
samples share its batch.
"""
import torch
from torch.nn import functional as F

from mmbrecq.registry import TASK_LOSSES


@TASK_LOSSES.register_module()
class ClassificationKL:
    """``KL(softmax(float logits) || softmax(quantized logits))``, summed over samples.

    Takes the classifier's ``tensor``-mode output (logits, or a tuple whose first item
    is the logits).
    """

    def __call__(self, q_out, fp_out) -> torch.Tensor:
        if isinstance(q_out, (tuple, list)):
            q_out, fp_out = q_out[0], fp_out[0]
        return F.kl_div(F.log_softmax(q_out, dim=1), F.log_softmax(fp_out, dim=1), reduction='sum',
                        log_target=True)


def _divergence(kind, q, f):
    if kind == 'sigmoid':  # binary KL per score: every class of every anchor is a Bernoulli
        p = torch.sigmoid(f)
        return (p * (F.logsigmoid(f) - F.logsigmoid(q)) + (1 - p) * (F.logsigmoid(-f) - F.logsigmoid(-q))).sum()
    if kind == 'softmax':  # categorical KL over the class axis (dim 1)
        return F.kl_div(F.log_softmax(q, dim=1), F.log_softmax(f, dim=1), reduction='sum', log_target=True)
    if kind == 'l2':  # box deltas: a Gaussian's KL is half the squared difference
        return 0.5 * (q - f).pow(2).sum()
    raise ValueError(f'unknown head-output kind {kind!r}: expected sigmoid, softmax or l2')


@TASK_LOSSES.register_module()
class DetectionDivergence:
    """Label-free Fisher analogue for detectors: divergence of the quantized model's raw head
    outputs from the float model's, summed over heads, levels, anchors and images.

    Reads :func:`mmbrecq.engine.detection.detection_forward`'s output, where every output
    is tagged with its kind: class scores are compared as distributions (binary KL for
    sigmoid classifiers such as RetinaNet's and the RPN's, categorical KL for the RoI
    head's softmax), box deltas as Gaussians (half the squared difference). These are
    the terms of the detector's own likelihood with the float model's predictions as
    soft labels, so the gradient plays the role that the classification KL plays for
    classifiers (BRECQ's diagonal Fisher with the float model as the label source).

    Args:
        weights: optional ``{output name: weight}`` (e.g. ``dict(rpn_cls=0.5)``); names
            are those of ``detection_forward`` (``cls``, ``out1``; ``rpn_cls``, ``rpn_reg``,
            ``roi_cls``, ``roi_out1``).
    """

    def __init__(self, weights=None):
        self.weights = dict(weights or {})

    def __call__(self, q_out, fp_out) -> torch.Tensor:
        if not isinstance(q_out, dict):
            raise TypeError('DetectionDivergence needs the tagged outputs of detection_forward, got '
                            f'{type(q_out).__name__}')
        unknown = sorted(set(self.weights) - set(q_out))
        if unknown:
            raise ValueError(f'quant_cfg.recon.task_loss.weights: no head output named {unknown}; '
                             f'outputs: {sorted(q_out)}')
        total = 0.
        for name, q in q_out.items():
            f = fp_out[name]
            w = self.weights.get(name, 1.0)
            for qv, fv in zip(q['values'], f['values']):
                total = total + w * _divergence(q['kind'], qv, fv.to(qv.dtype))
        return total
