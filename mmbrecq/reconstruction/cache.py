"""Sample caches for one unit (inputs, targets, Fisher weights) under a memory budget.

A cache is a ``(N, *shape)`` tensor on the compute device when it fits the device
budget, else in host memory (pinned when the device is CUDA, so batches copy
asynchronously), else a memory-mapped file in the work dir. Batches are gathered with
one ``index_select``: no per-iteration host sync when the cache lives on the device.
"""
import os
import os.path as osp
import tempfile

import numpy as np
import torch


def _host_available_bytes():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


class CacheBudget:
    """Decides where each new cache goes; tracks what is allocated.

    Args:
        device: the compute device.
        device_gb: bytes allowed on an accelerator (default: half of its free memory).
        host_gb: bytes allowed in host memory (default: 60% of available memory).
        disk_dir: folder for memory-mapped caches (default: a temporary folder).
    """

    def __init__(self, device, device_gb=None, host_gb=None, disk_dir=None):
        self.device = torch.device(device)
        on_accel = self.device.type != 'cpu'
        if on_accel and device_gb is None and self.device.type == 'cuda':
            free, _ = torch.cuda.mem_get_info(self.device)
            device_gb = free * 0.5 / 2**30
        self.device_bytes = int((device_gb or 0) * 2**30) if on_accel else 0
        host = host_gb if host_gb is not None else 0.6 * _host_available_bytes() / 2**30
        self.host_bytes = int(host * 2**30)
        self.disk_dir = disk_dir
        self.used = {'device': 0, 'host': 0, 'disk': 0}
        self.live = []

    def place(self, nbytes):
        if self.device.type != 'cpu' and self.used['device'] + nbytes <= self.device_bytes:
            return 'device'
        if self.used['host'] + nbytes <= self.host_bytes:
            return 'host'
        return 'disk'

    def allocate(self, shape, dtype=torch.float32, name='cache', rows=1):
        """A cache of ``shape = (N, *row_shape)``; ``rows > 1`` groups that many rows per
        sample (see :class:`SampleCache`)."""
        if rows > 1:
            shape = (shape[0], rows) + tuple(shape[1:])
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        where = self.place(nbytes)
        cache = SampleCache(shape, dtype, where, self, name, rows)
        self.used[where] += nbytes
        self.live.append(cache)
        return cache

    def release(self, cache):
        self.used[cache.where] -= cache.nbytes
        self.live.remove(cache)

    def free_all(self):
        """Free every cache still allocated (after an error: no memmap left on disk)."""
        for cache in list(self.live):
            cache.free()


class SampleCache:
    """A ``(N, *shape)`` buffer filled chunk by chunk and read back in random batches.

    With ``rows > 1`` every sample owns ``rows`` consecutive rows of what the unit sees
    (a two-stage detector's RoI head runs on ``images x proposals`` rows): the buffer is
    ``(N, rows, *row_shape)``, writes take and reads give ``(n * rows, *row_shape)``, and
    random batches draw whole samples, so an image's proposals stay together.
    """

    def __init__(self, shape, dtype, where, budget: CacheBudget, name, rows=1):
        self.shape, self.dtype, self.where, self.budget, self.name = tuple(shape), dtype, where, budget, name
        self.rows = rows
        self.row_shape = self.shape[2:] if rows > 1 else self.shape[1:]
        self.nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        self._file = None
        self._batch = None  # the optimisation loop's reused batch buffer (gather(reuse=True))
        if where == 'device':
            self.data = torch.empty(shape, dtype=dtype, device=budget.device)
        elif where == 'host':
            pin = budget.device.type == 'cuda'
            self.data = torch.empty(shape, dtype=dtype, pin_memory=pin)
        else:
            fd, self._file = tempfile.mkstemp(prefix=f'mmbrecq_{name}_', suffix='.bin', dir=budget.disk_dir)
            os.close(fd)
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
            self.data = torch.from_numpy(np.memmap(self._file, dtype=np_dtype, mode='w+', shape=shape))

    def __len__(self):
        return self.shape[0]

    def _grouped(self, chunk):
        return chunk.reshape((-1, self.rows) + tuple(chunk.shape[1:])) if self.rows > 1 else chunk

    def _flat(self, t):
        return t.flatten(0, 1) if self.rows > 1 else t

    def write(self, start, chunk: torch.Tensor):
        chunk = self._grouped(chunk.detach())
        self.data[start:start + chunk.shape[0]].copy_(chunk, non_blocking=self.where == 'host')

    def read(self, start, stop) -> torch.Tensor:
        """A contiguous slice of samples, on the compute device."""
        return self._flat(self.data[start:stop].to(self.budget.device, non_blocking=True))

    def gather(self, index: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """Samples ``index`` (a tensor on the cache's own device), on the compute device.

        ``reuse=True`` (the optimisation loop, which holds a batch for one step only) writes
        into the buffer of the previous call when it has the same size: on a CPU the page
        faults of a fresh batch-sized buffer cost more than the copy itself.
        """
        if self.where == 'device' or self.budget.device.type == 'cpu':  # no copy to another device
            index = index.to(self.data.device)
            if not reuse:
                return self._flat(self.data.index_select(0, index))
            buf = self._batch
            if buf is None or buf.shape[0] != index.shape[0]:
                buf = self._batch = self.data.new_empty((index.shape[0], ) + self.data.shape[1:])
            return self._flat(torch.index_select(self.data, 0, index, out=buf))
        return self._flat(self.data.index_select(0, index.cpu()).to(self.budget.device, non_blocking=True))

    def free(self):
        if self.data is None:
            return
        self.data = self._batch = None
        self.budget.release(self)
        if self._file is not None and osp.exists(self._file):
            os.remove(self._file)

    def describe(self):
        return f'{self.name}{list(self.shape)} {self.nbytes / 2**20:.1f} MiB on {self.where}'
