"""Fused one-pass CPU kernels for the reconstruction hot loop, with the torch code as fallback.

Why: every reconstruction step runs the LSQ fake quantizer and the (Fisher-weighted)
squared error on whole activation batches, e.g. 32x64x56x56 = 6.4 M floats. On a CPU the
torch code of these autograd nodes chains several passes over such a tensor, fresh
allocations (page faults) and bool-mask ops, which cost far more than the arithmetic
(``benchmarks/bench_fused_kernels.py`` measures both). The kernels in
``csrc/fused_quant.cpp`` do each node in one sweep over the data with as few fresh
buffers as possible. Which implementation runs is decided in :mod:`.dispatch`.

They compute the same float32 operations in the same order as the torch code (built with
``-ffp-contract=off``), so element-wise outputs are bit for bit the torch ones; reductions
accumulate in double over fixed blocks (deterministic whatever the thread count, and at
least as accurate as torch's float sums). The torch code stays the reference and is used
for everything the kernels do not cover (CUDA, other dtypes, per-channel scales).

The extension is compiled with ``torch.utils.cpp_extension.load`` on first use (cached
under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, in a directory
named after the sources' content; see :mod:`mmbrecq.ops.build` for the lock that keeps a
killed run from blocking the next). If the build or import fails, one warning names the
reason and the torch code is used from then on. ``MMBRECQ_CPU_KERNELS=0`` switches the
kernels off.
"""
import contextlib
import logging
import os
import os.path as osp
import threading
import time

import torch

from .build import build_directory, build_lock, extension_name, staged_sources

__all__ = ['cpu_kernels_available', 'get_cpu_kernels', 'reset_cpu_kernels', 'disabled', 'kernel_tensor_ok',
           'scalar_ok', 'under_tracing', 'kernels_apply', 'dense', 'fake_quant_forward', 'fake_quant_backward_x',
           'squared_error_forward', 'adaround_channels', 'adaround_soft_forward', 'adaround_rounding_loss',
           'log_quant_forward', 'ENV_VAR']

#: set to ``0`` to use the torch code only
ENV_VAR = 'MMBRECQ_CPU_KERNELS'
_NAME = 'mmbrecq_fused_quant'
_SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', 'fused_quant.cpp')
# -ffp-contract=off: no fused multiply-add, so every float op rounds as torch's does.
# No -march=native: the build cache may outlive the CPU it was built on.
_CFLAGS = ['-O3', '-ffp-contract=off', '-fno-math-errno', '-fno-trapping-math', '-fopenmp']
_LDFLAGS = ['-fopenmp']

_lock = threading.Lock()
_state = dict(loaded=False, module=None, reason=None, build_seconds=None)
_forced_off = [0]  # depth of ``disabled()`` contexts


def _disabled_by_env():
    return os.environ.get(ENV_VAR, '1').strip().lower() in ('0', 'false', 'no', 'off')


def _warn(msg):
    from mmengine.logging import print_log
    print_log(msg, logger='current', level=logging.WARNING)


def _build():
    # importing cpp_extension on a CUDA build of torch without a GPU logs a CUDA_HOME warning
    # that does not concern this CPU-only extension
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        log.setLevel(level)
    name = extension_name(_NAME, [_SOURCE], _CFLAGS + _LDFLAGS)
    build_dir = build_directory(name)
    with build_lock(build_dir, warn=_warn):
        # (copies: load() appends to the lists it is given, which would change the build's hash)
        return load(name=name, sources=staged_sources(build_dir, [_SOURCE]), build_directory=build_dir,
                    extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS), verbose=False)


def get_cpu_kernels():
    """The compiled extension module, or ``None`` (disabled by ``MMBRECQ_CPU_KERNELS=0`` or
    :func:`disabled`, or the build failed: then one warning says why). Built once per
    process, on first use."""
    if _forced_off[0]:
        return None
    if _state['loaded']:
        return _state['module']
    with _lock:
        if _state['loaded']:
            return _state['module']
        module = None
        if _disabled_by_env():
            _state['reason'] = f'disabled by {ENV_VAR}=0'
        else:
            t0 = time.perf_counter()
            try:
                module = _build()
            except Exception as e:  # noqa: BLE001 - any build/import failure means: use torch
                reason = f'{type(e).__name__}: {e}'.strip()
                _state['reason'] = reason
                _warn(f'mmbrecq: the fused CPU kernels could not be built or loaded ({reason[:2000]}); '
                      'using the (slower) torch implementation')
            _state['build_seconds'] = time.perf_counter() - t0
        _state['module'] = module
        _state['loaded'] = True
        return module


def reset_cpu_kernels():
    """Forget the loaded module and the environment decision (the next use decides again)."""
    with _lock:
        _state.update(loaded=False, module=None, reason=None, build_seconds=None)


@contextlib.contextmanager
def disabled():
    """Inside this context the torch code runs instead of the kernels (tests, benchmarks);
    the built module stays loaded."""
    _forced_off[0] += 1
    try:
        yield
    finally:
        _forced_off[0] -= 1


def cpu_kernels_available():
    """Whether the fused CPU kernels are used (built and not disabled)."""
    return get_cpu_kernels() is not None


def under_tracing():
    """Whether a tracer or compiler is recording (TorchScript, torch.compile): the kernels
    are opaque to them, so the torch code runs instead."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    return bool(is_compiling and is_compiling())


def scalar_ok(v):
    """A per-tensor quantization parameter the kernels take: a Python number or a
    one-element float32 CPU tensor."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and v.dtype == torch.float32 and v.device.type == 'cpu'
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def kernel_tensor_ok(*tensors):
    """All given tensors (``None`` skipped) are non-empty float32 CPU tensors of one shape."""
    shape = None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != 'cpu' or t.dtype != torch.float32 or t.numel() == 0:
            return False
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            return False
    return shape is not None


def kernels_apply(*tensors, per_tensor=()):
    """Whether a kernel may run: ``tensors`` (``None`` skipped) are non-empty float32 CPU
    tensors of one shape, ``per_tensor`` quantization parameters are Python numbers or
    one-element float32 CPU tensors not widening the tensors' shape, no tracer or compiler
    is recording, and the kernels are built. The one check every dispatch site uses."""
    if under_tracing() or not kernel_tensor_ok(*tensors):
        return False
    dim = next(t for t in tensors if t is not None).dim()
    for p in per_tensor:
        if not scalar_ok(p) or (isinstance(p, torch.Tensor) and p.dim() > dim):
            return False
    return get_cpu_kernels() is not None


def _f(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


# -- thin wrappers (no autograd): the callers check applicability ----------------------------
def fake_quant_forward(x, scale, zero_point, qmin, qmax, need_dscale=False, need_mask=False):
    """``(out, dscale, inside)`` of the fake quantizer in one sweep (``None`` for the ones not
    asked for). ``out`` equals ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` bit for bit;
    ``dscale`` is LSQ's ``d out / d s``: ``q - x / s`` on the grid, ``q`` where clamped;
    ``inside`` the bool grid mask."""
    mod = get_cpu_kernels()
    out, dscale, mask = mod.fake_quant_forward(x, _f(scale), _f(zero_point), int(qmin), int(qmax),
                                               bool(need_dscale), bool(need_mask))
    return out, dscale, mask


def dense(t):
    """``t`` itself when its elements fill ``numel()`` consecutive floats (contiguous,
    channels-last, any permutation), else a contiguous copy: the layout the kernels sweep
    (the kernels' own rule, so a caller that keeps the input for a backward keeps that copy)."""
    return get_cpu_kernels().dense(t)


def fake_quant_backward_x(grad, x, scale, zero_point, qmin, qmax, need_grad_x, need_sum):
    """``(grad * inside or None, sum(grad * dscale) or 0.0)`` in one sweep, ``inside`` and
    ``dscale`` recomputed from the forward's input ``x`` (the same floats as the forward's
    buffers would hold)."""
    return get_cpu_kernels().fake_quant_backward_x(grad, x, _f(scale), _f(zero_point), int(qmin), int(qmax),
                                                   bool(need_grad_x), bool(need_sum))


def squared_error_forward(out, target, weight, count, quant=None, need_grad_out=True, need_grad_scale=False):
    """``(sum(w * (fq(out) - y)^2), grad_out, scale_sum)`` in one sweep.

    ``quant``: ``None`` (no quantization) or ``(scale, zero_point, qmin, qmax)``.
    ``grad_out`` is ``(w * err * (2 / count)) * inside`` (float32 ``2 / count``), the
    gradient for an incoming gradient of 1; ``scale_sum`` is
    ``sum((w * err * (2 / count)) * dscale)`` (0.0 without quantization or when not asked for).
    """
    mod = get_cpu_kernels()
    if quant is None:
        s, z, qmin, qmax, q = 1.0, 0.0, 0, 0, False
    else:
        (s, z, qmin, qmax), q = quant, True
    loss, grad_out, scale_sum = mod.squared_error_forward(out, target, weight, int(count), q, _f(s), _f(z),
                                                          int(qmin), int(qmax), bool(need_grad_out),
                                                          bool(need_grad_scale))
    return loss, grad_out, scale_sum


def adaround_channels(alpha, w, scale, zero_point):
    """``(scale, zero_point)`` as contiguous per-output-channel vectors when the AdaRound
    kernels can take this grid (float32 CPU, per channel of dim 0 or per tensor), else
    ``None`` (the tensors themselves are checked by :func:`mmbrecq.ops.dispatch.select`)."""
    if w.dim() == 0:
        return None
    channels = w.shape[0]
    vecs = []
    for t in (scale, zero_point):
        if t.device.type != 'cpu' or t.dtype != torch.float32 or t.dim() > w.dim():
            return None
        if t.numel() == 1:
            vecs.append(t.reshape(1).expand(channels).contiguous())
        elif t.numel() == channels and t.dim() == w.dim() and t.shape[0] == channels:
            vecs.append(t.reshape(channels).contiguous())
        else:
            return None
    return tuple(vecs)


def adaround_soft_forward(alpha, w, scale, zero_point, qmin, qmax, zeta, gamma):
    """``(w_q, d w_q / d alpha)`` of AdaRound's soft weight in one sweep after torch's
    sigmoid; ``scale``/``zero_point`` from :func:`adaround_channels`."""
    sig = torch.sigmoid(alpha)
    return tuple(get_cpu_kernels().adaround_soft_forward(sig, w.contiguous(), scale, zero_point, zeta - gamma,
                                                         gamma, int(qmin), int(qmax)))


def adaround_rounding_loss(alpha, zeta, gamma, beta):
    """``(sum(1 - |2h - 1|^beta) as a float, its gradient w.r.t. alpha)``: torch's sigmoid
    and pow (vectorised transcendentals) around two one-sweep kernels."""
    mod = get_cpu_kernels()
    sig = torch.sigmoid(alpha)
    p = mod.adaround_offset(sig, zeta - gamma, gamma).pow_(beta - 1)  # |2h - 1|^(beta-1)
    loss = mod.adaround_reg(sig, p, zeta - gamma, gamma, beta)
    return loss, p


def log_quant_forward(x, delta, codes_per_octave, qmax, levels, mantissa_bits):
    """The logarithmic fake quantizer's output in one sweep: ``levels[c] * delta`` for the
    exactly rounded code ``c`` (see :class:`mmbrecq.quantizers.Log2Quantizer`), 0 where
    ``c >= qmax`` or ``x <= 0``; ``levels`` are the ``qmax`` floats ``2^(-c / k)`` and a
    0, ``mantissa_bits`` the ``k`` threshold mantissa fields."""
    return get_cpu_kernels().log_quant_forward(x, _f(delta), int(codes_per_octave), int(qmax), levels,
                                               [int(b) for b in mantissa_bits])


def build_seconds():
    """Seconds the first :func:`get_cpu_kernels` took (compile or cache load), ``None`` before."""
    return _state['build_seconds']


def unavailable_reason():
    """Why the kernels are not used (``None`` if they are, or before the first use)."""
    return _state['reason']
