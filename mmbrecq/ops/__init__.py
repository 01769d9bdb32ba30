"""Compiled helpers: fused one-pass CPU kernels for the reconstruction hot loop (see
:mod:`mmbrecq.ops.cpu_kernels`); the torch code stays the reference and the fallback."""
from .cpu_kernels import cpu_kernels_available, get_cpu_kernels, reset_cpu_kernels

__all__ = ['cpu_kernels_available', 'get_cpu_kernels', 'reset_cpu_kernels']
