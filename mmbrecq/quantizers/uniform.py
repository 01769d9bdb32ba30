"""Uniform affine fake quantizer: the grid, its range initialisation and its state."""
import torch
from torch import nn

from mmbrecq.registry import MODELS, QUANTIZERS

from .functional import fake_quant, qparams_from_range
from .range_search import lp_search_range, minmax_range

#: bit widths a quantizer accepts (16 is for "nearly float" ablations)
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def check_bits(bits, key='bits'):
    """Raise a ``ValueError`` naming ``key`` unless ``bits`` is a supported width."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(f'{key}={bits!r} is not a supported bit width; choose one of {VALID_BITS}')
    return bits


def grid_bounds(bits, symmetric=False, signed=True):
    """``(qmin, qmax)`` of a ``bits``-wide grid: ``[-2^(b-1), 2^(b-1)-1]`` for a signed
    symmetric grid, ``[0, 2^b-1]`` otherwise."""
    if symmetric and signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@MODELS.register_module()  # also buildable from any config as type='mmbrecq.X'
@QUANTIZERS.register_module()
class UniformQuantizer(nn.Module):
    """Per-tensor or per-channel uniform affine fake quantizer.

    Args:
        bits: grid size is ``2**bits``.
        num_channels: number of channels for a per-channel quantizer (``None``: per-tensor).
            Known at construction so that a freshly built model accepts a saved state dict.
        ch_axis: axis of ``x`` that indexes the channels.
        symmetric: symmetric grid (zero point 0) instead of asymmetric (the default, as BRECQ).
        signed: for symmetric grids, ``[-2^(b-1), 2^(b-1)-1]`` instead of ``[0, 2^b-1]``.
        init: ``'lp'`` (Lp-error search, the paper's) or ``'minmax'``.
        p, num_candidates: the Lp search's exponent and number of shrink factors.
        role: ``'weight'``, ``'act'`` (what :func:`mmbrecq.modules.quantizers_of` selects by)
            or ``None`` (a stand-alone quantizer).

    The range is set by :meth:`init_range` (or on the first forward between
    :meth:`start_observing` and :meth:`stop_observing`); using an uninitialised quantizer
    is an error rather than a silent pass-through. ``enabled=False`` turns it into the
    identity. Other code changes the grid and the range only through :meth:`set_bits`,
    :meth:`init_range` and :meth:`load_qparams`.
    """

    def __init__(self, bits=8, num_channels=None, ch_axis=0, symmetric=False, signed=True,
                 init='lp', p=2.4, num_candidates=100, role=None):
        super().__init__()
        if init not in ('lp', 'minmax'):
            raise ValueError(f"init={init!r}: expected 'lp' or 'minmax'")
        self.num_channels = num_channels
        self.ch_axis = ch_axis if num_channels is not None else None
        self.symmetric = symmetric
        self.signed = signed
        self.init = init
        self.p = p
        self.num_candidates = num_candidates
        if role not in (None, 'weight', 'act'):
            raise ValueError(f"role={role!r}: expected 'weight', 'act' or None")
        self.role = role
        self.bits, (self.qmin, self.qmax) = check_bits(bits), grid_bounds(bits, symmetric, signed)
        shape = () if num_channels is None else (num_channels, )
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer('zero_point', torch.zeros(shape))
        self.initialized = False
        self.observing = False
        self._reducer = None  # while observing: how statistics combine over processes
        self._passthrough = False  # while observing: leave the input unquantized
        self.enabled = True

    # -- state ---------------------------------------------------------------------------
    def get_extra_state(self):
        return {'initialized': self.initialized, 'bits': self.bits, 'grid': (self.qmin, self.qmax)}

    def set_extra_state(self, state):
        grid = tuple(state.get('grid', (self.qmin, self.qmax)))
        if state['bits'] != self.bits or grid != (self.qmin, self.qmax):
            self.initialized = False
            raise ValueError(f'checkpoint holds a {state["bits"]}-bit quantizer with grid {grid} where the '
                             f'model has {self.bits} bits, grid {(self.qmin, self.qmax)}')
        self.initialized = state['initialized']

    def extra_repr(self):
        kind = 'per-tensor' if self.num_channels is None else f'per-channel(axis={self.ch_axis})'
        grid = 'sym' if self.symmetric else 'asym'
        return f'bits={self.bits}, {kind}, {grid}, init={self.init}, enabled={self.enabled}'

    # -- range ---------------------------------------------------------------------------
    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.ch_axis is None:
            return t
        shape = [1] * x.dim()
        shape[self.ch_axis] = -1
        return t.view(shape)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, reducer=None):
        """Set scale and zero point from ``x`` (min-max or Lp search).

        ``reducer``: ``x`` is one process's part of the data, and the statistics are
        combined over processes (:class:`mmbrecq.utils.dist.ShardReducer`).
        """
        if self.init == 'lp':
            lo, hi = lp_search_range(x, self.qmin, self.qmax, self.symmetric, self.ch_axis, self.p,
                                     self.num_candidates, reducer=reducer)
        else:
            lo, hi = minmax_range(x, self.ch_axis, reducer=reducer)
        self.load_qparams(*qparams_from_range(lo, hi, self.qmin, self.qmax, self.symmetric))

    @torch.no_grad()
    def load_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor):
        """Set the range from a known scale and zero point (saved, memoised or exported)."""
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.initialized = True

    def set_role(self, role: str):
        """Say what this quantizer quantizes (``'weight'`` / ``'act'``); a quantizer built for
        one role cannot take the other."""
        if role not in ('weight', 'act'):
            raise ValueError(f"role={role!r}: expected 'weight' or 'act'")
        if self.role not in (None, role):
            raise ValueError(f'{type(self).__name__} was built as a {self.role!r} quantizer, not {role!r}')
        self.role = role

    def set_bits(self, bits: int):
        """Re-grid at ``bits``; the range must then be initialised again."""
        self.bits = check_bits(bits, 'bits')
        self.qmin, self.qmax = grid_bounds(bits, self.symmetric, self.signed)
        self.initialized = False

    def reset_range(self):
        """Forget the range (the next calibration initialises it again)."""
        self.initialized = False

    def start_observing(self, reducer=None, passthrough=False):
        """Initialise the range on the next forward (calibration); ``reducer`` as in
        :meth:`init_range`. ``passthrough``: until :meth:`stop_observing`, return the input
        unquantized, so that what follows sees the float stream (ranges of the float model)."""
        self.observing, self._reducer, self._passthrough = True, reducer, passthrough

    def stop_observing(self):
        self.observing, self._reducer, self._passthrough = False, None, False

    def _check_ready(self, x):
        if not self.initialized:
            if not self.observing:
                raise RuntimeError(f'{type(self).__name__} used before its range was initialised; '
                                   'calibrate the model first (mmbrecq.calibrate_activations)')
            self.init_range(x, self._reducer)

    # -- forward -------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._broadcast(self.scale, x)
        return fake_quant(x, scale, self._broadcast(self.zero_point, x), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._check_ready(x)
        if self._passthrough:
            return x
        return self.quantize(x)

    def integer_repr(self, x: torch.Tensor) -> torch.Tensor:
        """The integers on the grid that :meth:`forward` represents (for export)."""
        scale = self._broadcast(self.scale, x)
        zp = self._broadcast(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zp, self.qmin, self.qmax)
