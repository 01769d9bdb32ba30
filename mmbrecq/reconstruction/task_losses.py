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
