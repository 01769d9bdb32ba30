"""Every shim between the pinned OpenMMLab stack and torch 2.9, in one place: how checkpoints are read.

Each shim says which upstream behaviour it fixes and is covered by
``tests/test_utils_compat.py``, which fails without it. ``apply()`` is idempotent and
runs on ``import mmbrecq``.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, plain Python values
and exactly the types mmengine's own checkpoints hold (:data:`SAFE_GLOBALS`), so a file a
user received cannot run code when it is loaded. A file that needs more is refused with
:class:`~mmbrecq.utils.errors.UnsafeCheckpointError` naming the types; for a trusted file,
``--trust-checkpoint`` on the tools (``with trusted_checkpoints():`` in Python) loads it
with the full unpickler.
"""
import contextlib
import os.path as osp
import pickle
import re

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from .errors import CheckpointError, UnsafeCheckpointError

__all__ = ['apply', 'load_checkpoint_file', 'load_from_local_safe', 'trusted_checkpoints', 'SAFE_GLOBALS',
           'TRUST_HINT']

TRUST_HINT = ('if you trust the file (it runs code when loaded), pass --trust-checkpoint to the tool '
              '(Python: inside `with mmbrecq.utils.trusted_checkpoints():`)')

_applied = False
_trust = [False]
_STATISTICS = ('min', 'max', 'current', 'mean')  # HistoryBuffer's default statistics methods


def _history_buffer_getattr(obj, name):
    """``getattr`` restricted to what a pickled ``HistoryBuffer`` asks for.

    A ``HistoryBuffer`` carries its statistics methods (``HistoryBuffer.min`` …), which
    pickle writes as ``getattr(HistoryBuffer, 'min')``; a general ``getattr`` would reach
    far beyond that, so this one is registered under the name ``builtins.getattr`` instead.
    """
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'getattr({obj!r}, {name!r}) is not allowed by a weights-only load')


def _numpy_globals():
    multiarray = getattr(np, '_core', None) or np.core  # numpy >= 2 names it numpy._core
    out = [np.ndarray, np.dtype]
    for fn in (multiarray.multiarray._reconstruct, multiarray.multiarray.scalar):
        # pickles written under numpy 1.x name numpy.core, under numpy 2.x numpy._core
        out += [(fn, f'numpy.core.multiarray.{fn.__name__}'), (fn, f'numpy._core.multiarray.{fn.__name__}')]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return out


#: what mmengine's checkpoints hold beyond tensors and builtins (found by saving one with a
#: Runner: the message hub's ``HistoryBuffer`` objects with their statistics methods, numpy
#: arrays and scalars in ``message_hub`` / ``meta``)
SAFE_GLOBALS = [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')] + _numpy_globals()
_SAFE_NAMES = {g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}' for g in SAFE_GLOBALS}


@contextlib.contextmanager
def trusted_checkpoints(trust=True):
    """Inside this block checkpoints are read with the full unpickler (``weights_only=False``)
    when ``trust`` is true: only for files you trust, since their pickle may run code."""
    before = _trust[0]
    _trust[0] = bool(trust)
    try:
        yield
    finally:
        _trust[0] = before


def _refused_globals(path, message):
    names = re.findall(r'GLOBAL (\S+) was not an allowed global', message)
    try:
        names += [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in _SAFE_NAMES]
    except Exception:  # noqa: BLE001 - not a zip checkpoint: the message is all there is
        pass
    return list(dict.fromkeys(names))


def _refusal(message):
    """Whether a weights-only failure is a refused type (as opposed to bytes that are no pickle)."""
    return any(s in message for s in ('Unsupported global', 'unrecognized function', 'Can only build',
                                      'Can only create new object', 'is not allowed by a weights-only load',
                                      'is blocked'))


def load_checkpoint_file(path, map_location='cpu', what='checkpoint'):
    """``torch.load(path)`` the safe way; every failure names ``path`` as the ``what``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs types outside :data:`SAFE_GLOBALS` (and
            :func:`trusted_checkpoints` is off); names them and the opt-in.
        CheckpointError: the file is not a readable torch checkpoint (truncated, random bytes …).
    """
    path = osp.expanduser(str(path))
    if not osp.isfile(path):
        raise FileNotFoundError(f'{what} {path!r} does not exist')
    try:
        if _trust[0]:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler met, the file is the problem
        message = str(e)
        if not _trust[0] and isinstance(e, pickle.UnpicklingError) and _refusal(message):
            names = _refused_globals(path, message)
            detail = ', '.join(names) if names else message.splitlines()[-1][:300]
            raise UnsafeCheckpointError(
                f'{what} {path!r} holds objects a weights-only load refuses ({detail}); mmbrecq reads '
                'tensors, plain Python values and the types of mmengine checkpoints only; ' + TRUST_HINT) from None
        detail = re.search(r'WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)', message, re.S)
        detail = (detail.group(1) if detail else message).strip().splitlines()
        raise CheckpointError(f'{what} {path!r} is not a readable checkpoint (truncated, or not a torch file: '
                              f'{type(e).__name__}: {detail[0][:300] if detail else "the data ended early"})') from None


def load_from_local_safe(filename, map_location=None):
    """mmengine's local-file loader, reading with ``weights_only=True`` and :data:`SAFE_GLOBALS`.

    Why: torch >= 2.6 defaults ``torch.load(weights_only=True)``; mmengine 0.10.7's
    ``load_from_local`` calls ``torch.load`` without the argument and without an
    allowlist, so every checkpoint that mmengine itself writes (``message_hub`` holds
    ``HistoryBuffer`` objects and numpy arrays) fails with ``UnpicklingError``. Turning the
    check off would let any checkpoint run code; the allowlist reads exactly those types.
    Registered through mmengine's own scheme registry (``force=True``), not by patching
    ``torch.load``.
    """
    return load_checkpoint_file(filename, map_location=map_location)


def apply():
    global _applied
    if _applied:
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local_safe)
    _applied = True
