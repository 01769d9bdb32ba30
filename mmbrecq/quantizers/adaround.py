"""AdaRound: learned up/down rounding of weights (Nagel et al., 2020), as used by BRECQ."""
import torch
from torch import nn

from mmbrecq.registry import MODELS, QUANTIZERS

from .adaround_functional import rounding_loss, soft_weight
from .uniform import UniformQuantizer

ROUNDING_MODES = ('nearest', 'soft', 'hard')


@MODELS.register_module()  # also buildable from any config as type='mmbrecq.X'
@QUANTIZERS.register_module()
class AdaRoundQuantizer(UniformQuantizer):
    """Per-channel weight quantizer with a learnable rounding variable ``alpha`` per weight.

    ``w_q = s * (clamp(floor(w/s) + h(alpha) + z, qmin, qmax) - z)`` with the rectified
    sigmoid ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``.

    Rounding modes: ``'nearest'`` (plain rounding, before reconstruction), ``'soft'``
    (``h(alpha)`` in [0, 1], during optimisation), ``'hard'`` (``floor + (alpha >= 0)``,
    after). ``alpha`` starts where ``h(alpha)`` equals the fractional part of ``w/s``, so
    the soft weight at the start is the float weight itself. The scale is not learned.
    """

    def __init__(self, bits=4, weight_shape=None, zeta=1.1, gamma=-0.1, **kwargs):
        kwargs.setdefault('role', 'weight')
        super().__init__(bits=bits, **kwargs)
        if weight_shape is None:
            raise ValueError('AdaRoundQuantizer needs weight_shape (to hold one alpha per weight)')
        self.zeta, self.gamma = zeta, gamma
        self.alpha = nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        self.rounding = 'nearest'

    def get_extra_state(self):
        return {**super().get_extra_state(), 'rounding': self.rounding}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.rounding = state['rounding']
        self.alpha.requires_grad_(self.rounding == 'soft')

    def extra_repr(self):
        return f'{super().extra_repr()}, rounding={self.rounding}'

    @torch.no_grad()
    def init_alpha(self, w: torch.Tensor):
        """Place ``alpha`` so that ``h(alpha) = w/s - floor(w/s)``."""
        s = self._broadcast(self.scale, w)
        rest = (w / s - torch.floor(w / s)).clamp(1e-6, 1 - 1e-6)
        self.alpha.data.copy_(-torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1))

    def set_bits(self, bits: int):
        """Re-grid at ``bits``, back to nearest rounding (alpha is placed again from the new
        grid when soft rounding starts)."""
        self.set_rounding('nearest')
        super().set_bits(bits)

    def set_rounding(self, mode: str, w: torch.Tensor = None):
        """Switch rounding; entering ``'soft'`` from ``'nearest'`` initialises alpha from ``w``."""
        if mode not in ROUNDING_MODES:
            raise ValueError(f'rounding={mode!r}: expected one of {ROUNDING_MODES}')
        if mode in ('soft', 'hard') and self.rounding == 'nearest':
            if w is None:
                raise ValueError(f'entering {mode} rounding from nearest needs the float weight to '
                                 'place alpha (else every weight would round up)')
            self.init_alpha(w)
        self.alpha.requires_grad_(mode == 'soft')
        self.rounding = mode

    def h(self) -> torch.Tensor:
        """The rectified sigmoid: soft rounding offset in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)

    def round_loss(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser ``sum(1 - |2h - 1|^beta)``: pushes h to 0 or 1
        (one autograd node, see :mod:`.adaround_functional`)."""
        return rounding_loss(self.alpha, self.zeta, self.gamma, beta)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.rounding == 'nearest':
            return super().quantize(w)
        s = self._broadcast(self.scale, w).detach()
        z = self._broadcast(self.zero_point, w)
        if self.rounding == 'soft':
            return soft_weight(self.alpha, w, s, z, self.qmin, self.qmax, self.zeta, self.gamma)
        q = torch.clamp(torch.floor(w.detach() / s) + (self.alpha >= 0).to(w.dtype) + z, self.qmin, self.qmax)
        return (q - z) * s

    def integer_repr(self, w: torch.Tensor) -> torch.Tensor:
        if self.rounding == 'nearest':
            return super().integer_repr(w)
        s = self._broadcast(self.scale, w)
        z = self._broadcast(self.zero_point, w)
        offset = (self.alpha >= 0).to(w.dtype)  # soft mode: what hard rounding would give
        return torch.clamp(torch.floor(w / s) + offset + z, self.qmin, self.qmax).detach()
