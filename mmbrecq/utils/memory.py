"""Host memory: keep freed large blocks in the process for reuse (glibc).

glibc serves a request above its mmap threshold (adaptive, at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. PyTorch's CPU allocator does not cache,
so a reconstruction step, which allocates the same large activations every iteration (a
DeiT-S MLP activation at batch 32 is 39 MB, and so is its LSQ step gradient), pays a page
fault for every 4 KiB page of every such tensor, every step. Raising the mmap and trim
thresholds lets those blocks come back from the heap, already mapped. The price: the
process keeps its peak heap instead of returning it to the system between steps.
"""
import ctypes
import ctypes.util
import os
import sys

#: glibc ``mallopt`` parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_applied = None


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes (once per process).

    Returns whether they are raised: ``False`` off glibc/Linux, when ``mallopt`` refuses, or
    with ``MMBRECQ_KEEP_FREED_MEMORY=0``. Allocation results are unchanged; only where freed
    memory goes.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get('MMBRECQ_KEEP_FREED_MEMORY', '1') == '0' or not sys.platform.startswith('linux'):
        return False
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, 'mallopt', None)
    except OSError:
        mallopt = None
    if mallopt is None:  # not glibc (e.g. musl)
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    return _applied
