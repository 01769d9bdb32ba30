"""Where and how the fused kernels are built, so that a killed run never blocks the next one
and every checkout with the same sources shares one build.

``torch.utils.cpp_extension.load`` serialises builds with a ``lock`` file in the build
directory that it creates and deletes itself (also when the module is up to date and only
loaded): a process killed while it exists leaves it behind, and every later ``load`` of that
directory waits for it forever. So around ``load`` we hold our own lock, an ``fcntl.flock``
on ``mmbrecq.lock`` in the same directory, which the operating system releases when its
holder dies. Whoever holds it is the only mmbrecq process inside ``load`` for that
directory: a torch ``lock`` file found then was left by a dead process and is removed.
Waiting for a living holder ends after ``MMBRECQ_KERNEL_LOCK_TIMEOUT`` seconds (default
600) with an error naming the directory (the caller then uses the torch code).

The build directory is named after a hash of the sources' contents, the flags, and the
torch and Python versions, and the sources are compiled from a copy inside it: two
checkouts of the same code share one build (torch's build file records the sources'
absolute paths, so compiling from each checkout's own path would rebuild on every switch),
and changed sources get their own directory.
"""
import contextlib
import fcntl
import hashlib
import logging
import os
import os.path as osp
import sys
import time

import torch

__all__ = ['extension_name', 'build_directory', 'staged_sources', 'build_lock', 'TIMEOUT_ENV']

#: seconds to wait for another process's build of the kernels
TIMEOUT_ENV = 'MMBRECQ_KERNEL_LOCK_TIMEOUT'
LOCK_FILE = 'mmbrecq.lock'
TORCH_LOCK_FILE = 'lock'  # torch.utils.cpp_extension's FileBaton


def extension_name(base, sources, flags=()):
    """``base`` plus a hash of what the build depends on (source contents, flags, torch and
    Python versions), not of where the sources are."""
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), f'{sys.version_info[0]}.{sys.version_info[1]}',
                 *flags):
        h.update(part.encode() + b'\0')
    for src in sources:
        with open(src, 'rb') as f:
            h.update(osp.basename(src).encode() + b'\0' + f.read() + b'\0')
    return f'{base}_{h.hexdigest()[:12]}'


def build_directory(name):
    """``$TORCH_EXTENSIONS_DIR/<name>`` (default root ``~/.cache/torch_extensions``), created."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or get_default_build_root()
    path = osp.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def staged_sources(build_dir, sources):
    """Copies of ``sources`` in ``build_dir/src`` (written once, atomically): the paths the
    build records are then the same for every checkout."""
    src_dir = osp.join(build_dir, 'src')
    os.makedirs(src_dir, exist_ok=True)
    out = []
    for src in sources:
        with open(src, 'rb') as f:
            data = f.read()
        dst = osp.join(src_dir, osp.basename(src))
        if not osp.isfile(dst) or open(dst, 'rb').read() != data:
            tmp = f'{dst}.{os.getpid()}.tmp'
            with open(tmp, 'wb') as f:
                f.write(data)
            os.replace(tmp, dst)
        out.append(dst)
    return out


def _timeout():
    try:
        return float(os.environ.get(TIMEOUT_ENV, 600))
    except ValueError:
        return 600.0


@contextlib.contextmanager
def build_lock(build_dir, timeout=None, poll=0.1, warn=None):
    """Hold ``build_dir/mmbrecq.lock`` (see the module docstring); remove a torch ``lock``
    file left by a dead process. Raises ``TimeoutError`` naming the directory and the
    holder's process id after ``timeout`` seconds (default ``$MMBRECQ_KERNEL_LOCK_TIMEOUT`` or 600)."""
    timeout = _timeout() if timeout is None else timeout
    path = osp.join(build_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
                    raise TimeoutError(
                        f'waited {timeout:.0f} s for process {holder} to build or load the fused kernels in '
                        f'{build_dir}; if that process is stuck, end it (or set {TIMEOUT_ENV}=SECONDS to wait '
                        'longer)') from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        stale = osp.join(build_dir, TORCH_LOCK_FILE)
        if osp.exists(stale):  # no living mmbrecq process is inside load() for this directory
            os.remove(stale)
            (warn or logging.getLogger(__name__).warning)(f'mmbrecq: removed {stale}, a build lock left by a '
                                                          'killed run')
        yield
    finally:
        os.close(fd)  # releases the flock
