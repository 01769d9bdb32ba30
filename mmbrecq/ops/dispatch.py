"""The one door through which an implementation of a fused op is chosen.

Every single-node autograd Function of the hot loop (the LSQ fake quantizer, the
(quantized) squared error, AdaRound's soft weight and rounding loss, the logarithmic
quantizer of the softmax output) asks :func:`select`
which backend runs it on the tensors at hand. Today that is the compiled CPU kernels
(:mod:`.cpu_kernels`) or ``None``: the torch code in the Function itself, which is the
reference and runs everywhere else (CUDA, other dtypes, tracing, ONNX export). A CUDA,
Triton or ``torch.compile`` backend is added here, and nowhere else.
"""
from . import cpu_kernels

#: the fused ops and what each needs from the backend module
OPS = ('fake_quant', 'squared_error', 'quantized_squared_error', 'adaround_soft', 'adaround_rounding_loss',
       'log_quant')


def select(op, *tensors, per_tensor=(), ints=(), contiguous=()):
    """The backend module that runs ``op`` on these inputs, or ``None`` for the torch code.

    Args:
        op: one of :data:`OPS`.
        tensors: the element-wise operands (``None`` skipped); they must share one shape.
        per_tensor: per-tensor quantization parameters (numbers or one-element tensors).
        ints: grid bounds that must be Python integers.
        contiguous: tensors the backend reads in memory order.
    """
    if op not in OPS:
        raise KeyError(f'unknown fused op {op!r}; known: {OPS}')
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
        return None
    if not all(t.is_contiguous() for t in contiguous):
        return None
    return cpu_kernels if cpu_kernels.kernels_apply(*tensors, per_tensor=per_tensor) else None
