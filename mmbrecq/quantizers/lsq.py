"""Activation quantizer with a learned step size (LSQ) and the QDrop option."""
import math

import torch

from mmbrecq.registry import MODELS, QUANTIZERS
from .functional import fake_quant_lsq
from .uniform import UniformQuantizer


@MODELS.register_module()  # also buildable from any config as type='mmbrecq.X'
@QUANTIZERS.register_module()
class LSQQuantizer(UniformQuantizer):
    """Per-tensor activation quantizer whose step size is learned during reconstruction.

    The range (step and zero point) is initialised by the Lp search on calibration data;
    afterwards the step is a trainable parameter whose gradient is LSQ's, scaled by
    ``1/sqrt(features * qmax)`` (Esser et al., 2020) so that its update is comparable to
    the weights' whatever the layer size. The zero point stays fixed.

    ``drop_prob`` > 0 is QDrop's random dropping of the quantization: during
    optimisation each element keeps its float value with that probability.
    """

    def __init__(self, bits=8, grad_scale=True, **kwargs):
        kwargs.setdefault('num_channels', None)
        super().__init__(bits=bits, **kwargs)
        self.use_grad_scale = grad_scale
        self.drop_prob = 0.0
        self.scale.requires_grad_(True)

    def step_grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's scale of the step gradient for input ``x``: ``1/sqrt(features * qmax)``
        (1 when the step is not learned or ``grad_scale=False``)."""
        if not (self.use_grad_scale and self.scale.requires_grad):
            return 1.0
        features = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(features * self.qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quant_lsq(x, self._broadcast(self.scale, x), self._broadcast(self.zero_point, x), self.qmin,
                            self.qmax, self.step_grad_factor(x))
        if self.drop_prob > 0 and self.training:
            keep_float = torch.rand_like(x) < self.drop_prob
            xq = torch.where(keep_float, x, xq)
        return xq
