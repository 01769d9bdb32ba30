"""Twin-uniform quantizer for post-GELU activations (PTQ4ViT, Yuan et al., ECCV 2022).

GELU's output is lopsided: its negative values lie in ``[-0.17, 0)`` (the function's
minimum), its positive ones reach as far as the input does. One uniform grid over the
whole range gives the many small negative values the step the positive tail needs, so at
4 bits they all round to 0. The twin-uniform grid keeps the bit budget and spends one bit,
the sign of the code, on choosing between two uniform ranges, each with its own step:

    code c in [-2^(b-1), 2^(b-1) - 1]:   value = c * delta_neg  (c < 0)
                                         value = c * delta_pos  (c >= 0)

so ``2^(b-1)`` levels cover the negative part finely and ``2^(b-1)`` the positive part
(0 included): ``2^b`` distinct values, a ``b``-bit code. A negative input rounds on the
negative grid (to 0 at most), a non-negative one on the positive grid.

Both steps come from calibration data by the same Lp search as the uniform quantizers,
each on its own half of the data (an element of the other half is exactly 0 on the
searched grid, so it does not move the search). Reconstruction then learns ``delta_pos``
(kept in ``scale``) with LSQ's gradient, as :class:`LSQQuantizer` learns its step; the
negative step stays at its calibrated value, as PTQ4ViT keeps the negative range fixed
(PTQ4ViT's hardware variant also ties the two steps by a power of two: not done here).
Two grids are no single QuantizeLinear: the ONNX export traces this quantizer's own float
operations (``qdq_exportable = False``) and the integer checkpoint refuses it.
"""
import torch

from mmbrecq.registry import MODELS, QUANTIZERS

from .functional import fake_quant, fake_quant_lsq
from .lsq import LSQQuantizer
from .range_search import lp_search_range, minmax_range


@MODELS.register_module()
@QUANTIZERS.register_module()
class TwinUniformQuantizer(LSQQuantizer):
    """Per-tensor twin-uniform activation quantizer (see the module docstring).

    Args:
        bits: code width ``b``; ``2^(b-1)`` codes per sign.
        init: ``'lp'`` (Lp search of each step, the default) or ``'minmax'``.
        p, num_candidates, grad_scale: as for :class:`LSQQuantizer`.

    ``scale`` is the positive range's step (learned), the buffer ``neg_scale`` the negative
    range's (fixed after calibration); the zero point is 0.
    """

    qdq_exportable = False

    def __init__(self, bits=8, **kwargs):
        for key in ('symmetric', 'signed', 'num_channels'):
            kwargs.pop(key, None)  # act_quantizer-style keys that have no meaning here
        super().__init__(bits=bits, symmetric=True, signed=True, num_channels=None, **kwargs)
        self.register_buffer('neg_scale', torch.ones(()))

    def extra_repr(self):
        return f'bits={self.bits}, twin uniform (sign selects the range), per-tensor, enabled={self.enabled}'

    @property
    def neg_qmin(self) -> int:
        """The lowest code, ``-2^(b-1)``: the negative range is ``[neg_qmin * neg_scale, 0]``."""
        return self.qmin

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, reducer=None):
        """Both steps from ``x``: the positive one from its non-negative part on the grid
        ``[0, qmax]``, the negative one from its magnitudes below 0 on ``[0, -qmin]``."""
        x = x.detach().float()
        pos, neg = x.clamp_min(0), x.clamp_max(0).neg_()
        if self.init == 'lp':
            _, hi_pos = lp_search_range(pos, 0, self.qmax, True, None, self.p, self.num_candidates, reducer=reducer)
            _, hi_neg = lp_search_range(neg, 0, -self.qmin, True, None, self.p, self.num_candidates,
                                        reducer=reducer)
        else:
            hi_pos, hi_neg = minmax_range(pos, None, reducer)[1], minmax_range(neg, None, reducer)[1]
        tiny = 1e-8  # an empty half (e.g. no negative value): any positive step represents it
        self.load_twin_qparams((hi_pos / self.qmax).clamp_min(tiny), (hi_neg / -self.qmin).clamp_min(tiny))

    @torch.no_grad()
    def load_twin_qparams(self, pos_scale: torch.Tensor, neg_scale: torch.Tensor):
        """Set both steps (calibrated, saved or exported)."""
        self.neg_scale.copy_(neg_scale)
        self.load_qparams(pos_scale, torch.zeros_like(self.zero_point))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        pos_scale, neg_scale, zero = self.scale.to(x.dtype), self.neg_scale.to(x.dtype), self.zero_point.to(x.dtype)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # exported / compiled: plain ops
            pos, neg = fake_quant(x, pos_scale, zero, 0, self.qmax), fake_quant(x, neg_scale, zero, self.qmin, 0)
        else:
            # each half is LSQ's node on its own grid: outside it (the other sign) the value is
            # 0 and neither x nor the step gets a gradient from it
            pos = fake_quant_lsq(x, pos_scale, zero, 0, self.qmax, self.step_grad_factor(x))
            neg = fake_quant_lsq(x, neg_scale, zero, self.qmin, 0)
        return self._qdrop_mix(x, torch.where(x < 0, neg, pos))

    def integer_repr(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.clamp(torch.round(x / self.scale), 0, self.qmax)
        neg = torch.clamp(torch.round(x / self.neg_scale), self.qmin, 0)
        return torch.where(x < 0, neg, pos)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Values of integer codes (the inverse of :meth:`integer_repr` on the grid)."""
        return torch.where(codes < 0, codes * self.neg_scale, codes * self.scale)
