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
import functools

import torch

from mmbrecq.ops import dispatch
from mmbrecq.registry import MODELS, QUANTIZERS

from .range_search import minmax_range
from .uniform import UniformQuantizer

#: codes per octave of each base
_CODES_PER_OCTAVE = {'sqrt2': 2.0, '2': 1.0}


@functools.lru_cache(maxsize=None)
def _mantissa_thresholds(codes_per_octave: float):
    """The ``k`` floats that split ``[0.5, 1)`` into the rounding intervals of ``-k log2(m)``:
    the smallest float32 above ``2^(-(j + 1/2) / k)`` for ``j < k`` (never a float itself,
    so ``m < t_j`` is exactly ``-k log2(m) > j + 1/2``). With ``r = m 2^e`` (``frexp``),
    ``round(-k log2 r) = -k e + #{j: m < t_j}``: the exactly rounded code, with no log."""
    k = int(codes_per_octave)
    out = []
    for j in range(k):
        exact = 2.0**(-(j + 0.5) / k)
        t = torch.tensor(exact, dtype=torch.float32)
        if float(t) < exact:
            t = torch.nextafter(t, torch.tensor(1.0))
        out.append(t)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _mantissa_bits(codes_per_octave: float):
    """The 23-bit mantissa fields of :func:`_mantissa_thresholds` (what the CPU kernel compares)."""
    return tuple(int(t.view(torch.int32)) & 0x7FFFFF for t in _mantissa_thresholds(codes_per_octave))


@functools.lru_cache(maxsize=None)
def _levels(qmax: int, codes_per_octave: float) -> torch.Tensor:
    """``2^(-c / k)`` for the codes ``c < qmax``, float32, as the torch code computes them,
    then 0 for the top code (the CPU kernel's table)."""
    levels = torch.exp2(torch.arange(qmax + 1, dtype=torch.float32).div_(-codes_per_octave))
    return levels.index_fill_(0, torch.tensor([qmax]), 0.0)


def exact_log_codes(x: torch.Tensor, delta, codes_per_octave: float) -> torch.Tensor:
    """``round(-k log2(max(x / delta, tiny)))`` rounded exactly (see
    :func:`_mantissa_thresholds`), clamped to >= 0, as floats of ``x``'s dtype; nan stays nan.

    ``log2`` in floating point can land on the wrong side of a half-code boundary (its result
    is rounded); the exponent and mantissa comparisons cannot, and they are what the fused
    CPU kernel computes, so both give the same codes bit for bit.
    """
    r = (x / delta).clamp_min(torch.finfo(x.dtype).tiny)
    m, e = torch.frexp(r)
    codes = e.to(x.dtype).mul_(-codes_per_octave)
    for t in _mantissa_thresholds(codes_per_octave):
        codes.add_(m < t.to(x.dtype))
    return codes.clamp_min_(0).masked_fill_(r.isnan(), float('nan'))


class _LogQuantSTE(torch.autograd.Function):
    """The log grid's values, gradient straight through.

    On the CPU (float32) one sweep of the fused kernel (:mod:`mmbrecq.ops`); elsewhere the
    torch ops, in place in one buffer. Either way no autograd graph over full-size
    temporaries: on the softmax output of an attention layer (batch x heads x tokens^2
    elements) that graph was most of the quantizer's cost in a reconstruction step. In
    float32 ``exp2`` instead of ``pow(2, .)`` (the same floats on the grid's exponents
    ``-c/k``, which a test checks for every code, and several times cheaper).
    """

    @staticmethod
    def forward(ctx, x, delta, codes_per_octave, qmax):
        with torch.no_grad():
            backend = dispatch.select('log_quant', x, per_tensor=(delta, ), ints=(qmax, ))
            if backend is not None:
                return backend.log_quant_forward(x, delta, codes_per_octave, qmax, _levels(qmax, codes_per_octave),
                                                 _mantissa_bits(codes_per_octave))
            t = exact_log_codes(x, delta, codes_per_octave)
            zero = (t >= qmax).logical_or_(x <= 0)
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
        """The codes, exactly rounded (:func:`exact_log_codes`); under a tracer (ONNX export)
        the same through ``log2``, which has an ONNX form (equal but for float rounding at a
        half-code boundary)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            ratio = (x / delta).clamp_min(torch.finfo(x.dtype).tiny)
            return torch.round(-torch.log2(ratio) * self.codes_per_octave).clamp_min(0)
        return exact_log_codes(x, delta, self.codes_per_octave)

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
