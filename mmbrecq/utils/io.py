"""Outputs that are never half-written, and the lock that keeps two runs out of one work dir.

Every file a run writes (checkpoints, JSON summaries, exports) goes to a temporary file
in the same directory and replaces the target with ``os.replace`` only once it is
complete, so a run killed while writing leaves the previous good file (or none), never a
truncated one. The temporary name starts with the target's name, so a leftover of a
killed run sits next to the file it belongs to.
"""
import contextlib
import errno
import fcntl
import json
import os
import os.path as osp
import uuid

import torch

from .errors import InputError, WorkDirBusy

__all__ = ['atomic_path', 'atomic_save', 'atomic_json_dump', 'to_plain', 'WorkDirLock', 'make_work_dir']


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to ``path``; moves it onto ``path`` when the block ends
    without an error, deletes it otherwise. For writers that take a path (``torch.onnx.export``,
    ``savefig``)."""
    path = osp.abspath(path)
    directory, base = osp.split(path)
    tmp = osp.join(directory, f'.{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')  # created by the writer
    try:
        yield tmp
        with open(tmp, 'rb') as f:  # on disk before it becomes the file others read
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """``torch.save(obj, path)``, all or nothing; returns ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def atomic_json_dump(obj, path, **kwargs):
    """``json.dump(obj, open(path, 'w'), **kwargs)``, all or nothing; returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            json.dump(obj, f, **kwargs)
    return path


def to_plain(obj):
    """``obj`` with every mapping turned into a ``dict``, lists and tuples kept, their items
    converted: what ``torch.load(weights_only=True)`` reads back (an mmengine ``ConfigDict``
    needs ``weights_only=False``)."""
    if isinstance(obj, dict):  # ConfigDict is a dict subclass
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def make_work_dir(path):
    """Create ``path`` (and its parents), or raise an :class:`InputError` that names it."""
    try:
        os.makedirs(osp.abspath(path), exist_ok=True)
    except OSError as e:
        reason = 'a file of that name is in the way' if e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror
        raise InputError(f'work dir {path!r} cannot be created ({reason}: {e}); choose another --work-dir') from e
    return path


class WorkDirLock:
    """An exclusive ``fcntl.flock`` on ``work_dir/.ptq.lock``, held for the whole run.

    The operating system releases it when the process ends, however it ends (also on
    SIGKILL), so a killed run never blocks the next; a second run started while the first
    one lives is refused with :class:`WorkDirBusy` naming the holder's process id.
    """

    def __init__(self, work_dir, name='.ptq.lock'):
        self.path = osp.join(osp.abspath(work_dir), name)
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            finally:
                os.close(fd)
            raise WorkDirBusy(f'work dir {osp.dirname(self.path)!r} is in use by another run (process {holder}, '
                              f'lock {self.path}); wait for it to end, or choose another --work-dir') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
