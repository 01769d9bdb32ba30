"""Logarithmic quantizer for post-softmax values (RepQ-ViT's log-sqrt2, or plain log2).

Attention probabilities follow a power law: most are tiny, a few are close to 1. A
uniform 4-bit grid on [0, 1] has a step of 1/15, so nearly every probability rounds to 0
and the few large ones are all that survives. A logarithmic grid
``delta * 2^(-code / k)`` (``k = 2``: log-sqrt2, steps of sqrt(2); ``k = 1``: log2) spends
its codes on the orders of magnitude instead. The top code stands for 0, so a ``b``-bit
quantizer really has ``2^b`` levels (RepQ-ViT's reference lets an extra value 0 through).

The gradient is straight-through (identity), so reconstruction can propagate through it;
``delta`` is set from calibration data by an L2 search over shrunk maxima and not learned.
The grid is not uniform, so it has no QuantizeLinear form: the ONNX export leaves its
fake quantization as plain float operations (``qdq_exportable = False``).
"""
import math

import torch

from mmbrecq.registry import MODELS, QUANTIZERS

from .range_search import minmax_range
from .uniform import UniformQuantizer

#: codes per octave of each base
_CODES_PER_OCTAVE = {'sqrt2': 2.0, '2': 1.0}


class _LogQuantSTE(torch.autograd.Function):
    """The log grid's values computed in place in one buffer, gradient straight through.

    Same values as :meth:`Log2Quantizer._values` (the tests check), but no autograd graph
    over a dozen full-size temporaries: on the softmax output of an attention layer (batch x
    heads x tokens^2 elements) that graph was most of the quantizer's cost in a reconstruction
    step. Fewer passes than the plain ops, too: in float32 ``exp2`` instead of ``pow(2, .)``
    (the same floats on the grid's exponents ``-c/k``, which a test checks for every code, and
    several times cheaper; other dtypes keep ``pow``),
    ``x / (-k)`` for ``-(x / k)`` (the same float), and no separate ``x <= 0`` test when a
    non-positive input's code (that of the clamp floor ``tiny``) already lies past the top.
    """

    @staticmethod
    def forward(ctx, x, delta, codes_per_octave, qmax):
        with torch.no_grad():
            tiny = torch.finfo(x.dtype).tiny
            t = (x / delta).clamp_min_(tiny).log2_().mul_(-codes_per_octave)
            t.round_().clamp_min_(0)
            zero = t >= qmax
            if -codes_per_octave * math.log2(tiny) < qmax:  # e.g. 8 bits, log-sqrt2: floor code 252 < 255
                zero.logical_or_(x <= 0)
            t.div_(-codes_per_octave)
            torch.exp2(t, out=t) if x.dtype == torch.float32 else torch.pow(2.0, t, out=t)
            return t.mul_(delta).masked_fill_(zero, 0.0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


@MODELS.register_module()
@QUANTIZERS.register_module()
class Log2Quantizer(UniformQuantizer):
    """Per-tensor logarithmic quantizer of non-negative activations (softmax outputs).

    Args:
        bits: ``2**bits`` levels: ``delta * 2^(-c / k)`` for codes ``c < 2**bits - 1``, and 0.
        base: ``'sqrt2'`` (k = 2, RepQ-ViT) or ``'2'`` (k = 1).
        num_candidates: shrink factors of the observed maximum tried for ``delta``.
    """

    qdq_exportable = False

    def __init__(self, bits=4, base='sqrt2', num_candidates=100, **kwargs):
        if base not in _CODES_PER_OCTAVE:
            raise ValueError(f'Log2Quantizer: base={base!r}, expected one of {tuple(_CODES_PER_OCTAVE)}')
        for key in ('init', 'p', 'symmetric', 'num_channels'):
            kwargs.pop(key, None)  # act_quantizer-style keys that have no meaning here
        super().__init__(bits=bits, num_channels=None, symmetric=False, init='minmax',
                         num_candidates=num_candidates, **kwargs)
        self.base = base
        self.codes_per_octave = _CODES_PER_OCTAVE[base]

    def extra_repr(self):
        return f'bits={self.bits}, log base {self.base}, per-tensor, enabled={self.enabled}'

    def _codes(self, x, delta):
        ratio = (x / delta).clamp_min(torch.finfo(x.dtype).tiny)
        return torch.round(-torch.log2(ratio) * self.codes_per_octave).clamp_min(0)

    def _values(self, x, delta):
        codes = self._codes(x, delta)
        values = delta * torch.pow(2.0, -codes / self.codes_per_octave)  # (exp2 has no ONNX export)
        return torch.where((codes >= self.qmax) | (x <= 0), torch.zeros_like(values), values)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, reducer=None, max_elements: int = 1 << 18):
        """``delta`` (kept in ``scale``): the shrunk maximum with the least squared error.
        Several processes (``reducer``): the global maximum, the same on every rank."""
        zero = torch.zeros_like(self.zero_point)
        if reducer is not None:
            _, hi = minmax_range(x, None, reducer)
            self.load_qparams(hi.clamp_min(torch.finfo(hi.dtype).tiny), zero)
            return
        v = x.detach().float().reshape(-1)
        if v.numel() > max_elements:
            v = v[::-(-v.numel() // max_elements)]
        top = v.max().clamp_min(torch.finfo(v.dtype).tiny)
        best, best_err = top, float('inf')
        for i in range(self.num_candidates):
            delta = top * (1.0 - i / (2 * self.num_candidates))  # down to half the maximum
            err = float((self._values(v, delta) - v).pow(2).sum())
            if err < best_err:
                best, best_err = delta, err
        self.load_qparams(best, zero)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # exported / compiled: plain ops
            xq = self._values(x, self.scale.to(x.dtype))
            return x + (xq - x).detach()  # straight-through
        return _LogQuantSTE.apply(x, self.scale.to(x.dtype), self.codes_per_octave, self.qmax)

    def integer_repr(self, x: torch.Tensor) -> torch.Tensor:
        codes = self._codes(x, self.scale).clamp_max(self.qmax)
        return torch.where(x <= 0, torch.full_like(codes, self.qmax), codes)
