"""Post-LayerNorm activations: per-channel ranges, deployed per-tensor (RepQ-ViT's scale
reparameterisation).

LayerNorm outputs differ by orders of magnitude between channels, so a per-tensor grid
wastes most of its codes on a few wide channels. :class:`ChannelReparamQuantizer` first
quantizes per channel (step ``s_c``, zero point ``z_c`` from calibration data); then
:meth:`fold_to_per_tensor` turns it into a per-tensor quantizer with step ``mean(s_c)`` and
zero point ``round(mean(z_c))`` and returns the per-channel factor ``r`` and shift ``b``
that the LayerNorm affine and the next Linear absorb (``mmbrecq.modules.reparam``):

    LayerNorm:  gamma' = gamma / r,  beta' = beta / r - b
    Linear:     W' = W * r (per input channel),  bias' = bias + W' b

with ``r_c = s_c / mean(s)`` and ``b_c = (round(mean z) - z_c) * mean(s)``. The per-tensor
grid on the new LayerNorm output gives every element exactly the integer code its channel's
grid gave before, and the Linear maps the result back to the same float output, so the
quantized model is the per-channel one while its deployment (ONNX QDQ) is per-tensor.

**Shift-free fold** (:meth:`ChannelReparamQuantizer.set_shift_free`): every channel's grid
shares one zero point ``z``, so ``b = 0`` and only the factor ``r`` is folded. Two pairs
need it: a Linear without a bias (``W' b`` would need a bias the float model does not have,
and the exported checkpoints would no longer fit it), and Swin's ``norm1 -> qkv``, whose
window attention zero-pads the LayerNorm output between the two (after a shifted fold a
padded 0 would stand for the LayerNorm output ``r * b``, not 0, and the padded tokens' keys
and values would change; with ``b = 0`` a padded 0 still means 0). Each channel keeps its
range: its step grows to ``max(hi_c / (qmax - z), lo_c / (qmin - z))``, so a channel whose
own zero point was far from ``z`` loses some resolution; it is still a per-channel step,
deployed per-tensor.
"""
import torch

from mmbrecq.registry import MODELS, QUANTIZERS

from .functional import fake_quant, qparams_from_range
from .lsq import LSQQuantizer
from .range_search import lp_search_range, minmax_range


@MODELS.register_module()
@QUANTIZERS.register_module()
class ChannelReparamQuantizer(LSQQuantizer):
    """Per-channel (last axis) at calibration, per-tensor LSQ after :meth:`fold_to_per_tensor`.

    Between its calibration and the fold it quantizes per channel (so everything calibrated
    downstream sees the values the folded model will compute). Its state dict holds only the
    per-tensor step: it is saved after the fold, with the folded LayerNorm and Linear.
    """

    def __init__(self, bits=8, **kwargs):
        super().__init__(bits=bits, **kwargs)
        self.folded = False
        self.shift_free = False  # one zero point for every channel: the fold has no shift
        self.channel_qparams = None  # (scale (C,), zero point (C,)) between calibration and fold

    def get_extra_state(self):
        return dict(super().get_extra_state(), folded=self.folded)

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.folded = state.get('folded', False)
        self.channel_qparams = None

    def extra_repr(self):
        stage = 'folded' if self.folded else 'per-channel until folded'
        return f'{super().extra_repr()}, {stage}'

    @property
    def pending_fold(self) -> bool:
        """Calibrated per channel and not folded yet."""
        return self.channel_qparams is not None and not self.folded

    @property
    def fusable(self) -> bool:
        """Plain per-tensor LSQ once folded (its per-channel stage is not)."""
        return self.folded and self._plain_now()

    @torch.no_grad()
    def set_shift_free(self):
        """Give every channel's grid one zero point, so that :meth:`fold_to_per_tensor` returns
        a zero shift (module docstring). Before calibration it applies to the grid calibration
        will set; on a per-channel grid awaiting the fold, that grid is redrawn around the
        same ranges."""
        if self.folded:
            raise RuntimeError('ChannelReparamQuantizer.set_shift_free: already folded')
        self.shift_free = True
        if self.channel_qparams is not None:
            scale, zp = self.channel_qparams
            self._set_channel_grid((self.qmin - zp) * scale, (self.qmax - zp) * scale)

    def _set_channel_grid(self, lo, hi):
        scale, zp = qparams_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)
        if self.shift_free and not self.symmetric:  # (a symmetric grid's zero point is shared already)
            scale, zp = self._shared_zero_point(zp, lo.clamp_max(0), hi.clamp_min(0))
        self.channel_qparams = (scale, zp)
        self.load_qparams(scale.mean(), zp.mean().round())

    def _shared_zero_point(self, zp, lo, hi):
        """Per-channel steps on one zero point (the rounded mean) that keep every ``[lo_c, hi_c]``."""
        z = zp.mean().round()  # kept off an end of the grid where some channel needs that side
        z = z.clamp(self.qmin + int(bool((lo < 0).any())), self.qmax - int(bool((hi > 0).any())))
        up = torch.where(hi > 0, hi / (self.qmax - z).clamp_min(1), torch.zeros_like(hi))
        down = torch.where(lo < 0, lo / (self.qmin - z).clamp_max(-1), torch.zeros_like(lo))
        return torch.maximum(up, down).clamp_min(1e-8), torch.full_like(zp, float(z))

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, reducer=None):
        if self.folded or reducer is not None:
            return super().init_range(x, reducer)  # several processes: per-tensor statistics (no fold)
        axis = x.dim() - 1
        if self.init == 'lp':
            lo, hi = lp_search_range(x, self.qmin, self.qmax, self.symmetric, axis, self.p, self.num_candidates)
        else:
            lo, hi = minmax_range(x, axis)
        self._set_channel_grid(lo, hi)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.pending_fold:
            scale, zp = self.channel_qparams
            return fake_quant(x, scale.to(x.dtype), zp.to(x.dtype), self.qmin, self.qmax)
        return super().quantize(x)

    @torch.no_grad()
    def fold_to_per_tensor(self):
        """Become per-tensor; return ``(r, b)``, the per-channel factor and shift to fold (see
        the module docstring)."""
        if not self.pending_fold:
            raise RuntimeError('ChannelReparamQuantizer.fold_to_per_tensor: not calibrated per channel '
                               '(or already folded)')
        scale, zp = self.channel_qparams
        step = scale.mean()
        z = zp.mean().round().clamp(self.qmin, self.qmax)
        r = scale / step
        b = (z - zp) * step
        self.load_qparams(step, z)
        self.channel_qparams = None
        self.folded = True
        return r, b
