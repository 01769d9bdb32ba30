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

    QDrop (:meth:`set_qdrop`): during optimisation (training mode) each element keeps its
    *quantized* value with probability ``qdrop_prob`` and its float value otherwise, the
    convention of ``quant_cfg.recon.qdrop_prob``; ``None`` is no QDrop. At a unit's input
    the choice is not the quantizer's own: the step draws which elements come from the
    quantized stream and which from the float model, and :meth:`set_stream_mask` tells the
    quantizer to quantize only the former.

    :meth:`fix_step` keeps the step at its calibrated value: the reconstruction then leaves
    it out (``learn_step`` is ``False``) and computes no gradient for it.
    """

    def __init__(self, bits=8, grad_scale=True, **kwargs):
        kwargs.setdefault('num_channels', None)
        kwargs.setdefault('role', 'act')
        super().__init__(bits=bits, **kwargs)
        self.use_grad_scale = grad_scale
        self.qdrop_prob = None
        self.stream_mask = None
        self.learn_step = True
        self.scale.requires_grad_(True)

    def fix_step(self):
        """Keep the step as calibrated: not learned by the reconstruction, no gradient."""
        self.learn_step = False
        self.scale.requires_grad_(False)

    def set_qdrop(self, prob=None):
        """QDrop on (``prob``: probability of keeping the quantized value, in [0, 1]) or off."""
        if prob is not None and not 0 <= prob <= 1:
            raise ValueError(f'qdrop_prob must be in [0, 1] or None, got {prob!r}')
        self.qdrop_prob = None if prob == 1 else prob

    def set_stream_mask(self, quantized=None):
        """QDrop at a unit's input: quantize only the elements where ``quantized`` is True.

        QDrop feeds a unit ``where(rand < p, Q(x_quantized_stream), x_float_model)``; the
        step mixes the two cached streams before the unit runs, and the unit's own input
        quantizer must then leave the float-model elements as they are (quantizing them
        would undo the drop). The mask overrides :meth:`set_qdrop`'s random draw, in
        training and eval mode alike (a frozen input quantizer is in eval mode); ``None``
        turns it off.
        """
        if quantized is not None and quantized.dtype != torch.bool:
            raise TypeError(f'the stream mask must be a bool tensor, got {quantized.dtype}')
        self.stream_mask = quantized

    @property
    def step_grad_samplable(self) -> bool:
        """Whether the step gradient may be estimated on a subset of the batch's samples now
        (:meth:`mmbrecq.modules.QuantLinear.sample_input_step_grad`): the step is being
        learned, and each sample's quantized value depends on that sample alone: the plain
        per-tensor quantizer of :attr:`fusable` (no QDrop draw over the batch, no stream mask)."""
        return (type(self).quantize is LSQQuantizer.quantize and self.learn_step and self.scale.requires_grad
                and self._plain_now())

    def quantize_sample(self, rows: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """``rows`` (a sample of ``full``'s rows, when :attr:`step_grad_samplable`) quantized
        with the step gradient scaled as for ``full`` (LSQ's factor counts ``full``'s features)."""
        if not self.step_grad_samplable:
            raise RuntimeError(f'{type(self).__name__}: its step gradient cannot be sampled now '
                               '(see step_grad_samplable)')
        return fake_quant_lsq(rows, self._broadcast(self.scale, rows), self._broadcast(self.zero_point, rows),
                              self.qmin, self.qmax, self.step_grad_factor(full))

    @property
    def fusable(self) -> bool:
        """Whether :meth:`forward` is exactly the per-tensor LSQ fake quantizer right now, so
        that a fused kernel (:func:`mmbrecq.reconstruction.objective.quantized_reconstruction_loss`)
        may stand in for it: enabled, initialised, per-tensor, no QDrop in training, no hook.
        A subclass whose :meth:`quantize` or :meth:`forward` computes something else is not
        fusable unless it says when it is by overriding this property.
        """
        cls = type(self)
        return cls.quantize is LSQQuantizer.quantize and cls.forward is LSQQuantizer.forward and self._plain_now()

    def _plain_now(self) -> bool:
        """The state part of :attr:`fusable` (what a subclass's override reuses)."""
        return (self.enabled and self.initialized and self.ch_axis is None
                and not (self.qdrop_prob is not None and self.training) and self.stream_mask is None
                and not (self._forward_hooks or self._forward_pre_hooks))

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
        return self._qdrop_mix(x, xq)

    def _qdrop_mix(self, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """QDrop: the unit input's stream mask (:meth:`set_stream_mask`), else in training each
        element keeps ``xq`` with probability ``qdrop_prob`` and ``x`` otherwise (shared by the
        subclasses whose grid differs)."""
        if self.stream_mask is not None:
            if self.stream_mask.shape != x.shape:
                raise ValueError(f'stream mask of shape {tuple(self.stream_mask.shape)} for an input of shape '
                                 f'{tuple(x.shape)}')
            xq = torch.where(self.stream_mask, xq, x)
        elif self.qdrop_prob is not None and self.training:
            keep_float = torch.rand_like(x) < 1 - self.qdrop_prob
            xq = torch.where(keep_float, x, xq)
        return xq
