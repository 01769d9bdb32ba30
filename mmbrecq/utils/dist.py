"""Distributed PTQ: how the calibration set is split over ranks, and the reductions that
make a run on W processes compute what one process computes on the whole set.

Everything goes through ``torch.distributed`` (NCCL on GPUs, gloo on CPU) as set up by
mmengine's launchers (``tools/ptq.py --launcher pytorch|slurm``) and mmengine's
``mmengine.dist`` helpers. With one process (no process group, or world size 1) every
function here is the identity and no collective runs.

**Layout of the calibration set.** The single-process calibration set is a sequence of
``N`` samples (its batches concatenated). With world size ``W``, global sample ``i``
lives on rank ``i % W`` as local sample ``i // W`` (the interleaving of mmengine's
``DefaultSampler``): a rank's part of global batch ``b`` is the samples of that batch at
global index ``≡ rank (mod W)``, and its local batches are those parts, in order. The
union over ranks is exactly the single-process set. :func:`shard_batch` cuts a global
batch this way; the PTQ loop builds its calibration set with it.
"""
import datetime
import os
import subprocess

import torch
from mmengine.dataset import DefaultSampler
from mmengine.dist import all_reduce, barrier, get_dist_info, get_world_size, is_main_process

from .batch import batch_size

__all__ = ['is_sharded', 'shard_size', 'shard_positions', 'shard_batch', 'UnshardedSampler',
           'read_global_stream', 'global_sum', 'global_max', 'main_then_barrier', 'ShardReducer',
           'init_cpu_dist', 'prepare_launcher']


def is_sharded():
    """True when the calibration data are split over more than one process."""
    return get_world_size() > 1


def shard_size(total, rank, world_size):
    """Number of the ``total`` global samples that live on ``rank`` (``i % W == rank``)."""
    return max(0, -(-(total - rank) // world_size))


def shard_positions(offset, n, rank=None, world_size=None):
    """Positions in a global batch of ``n`` samples starting at global index ``offset`` that
    belong to ``rank``."""
    if rank is None:
        rank, world_size = get_dist_info()
    first = (rank - offset) % world_size
    return list(range(first, n, world_size))


def _take(x, positions, n):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
        return x[torch.as_tensor(positions, dtype=torch.long, device=x.device)]
    if isinstance(x, dict):
        return {k: _take(v, positions, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and len(x) == n:
        picked = [x[p] for p in positions]
        return picked if isinstance(x, list) else tuple(picked)
    return x


def shard_batch(batch, offset, n=None):
    """This rank's part of a global calibration batch whose first sample has global index
    ``offset``: its samples at global index ``≡ rank (mod W)``. ``None`` when the part is
    empty (a short last batch). ``batch`` is a tensor, or a dict / list / tuple of
    per-sample tensors and lists (an mmengine batch after the data preprocessor); ``n``
    is its number of samples (default: read from it).

    The first batch must give every rank at least one sample: activation ranges are
    initialised on it (:class:`ShardReducer` rebuilds the global batch's statistics).
    """
    rank, world_size = get_dist_info()
    if world_size == 1:
        return batch
    if n is None:
        n = batch_size(batch)
    positions = shard_positions(offset, n, rank, world_size)
    if offset == 0 and n < world_size:
        raise ValueError(f'the first calibration batch has {n} samples for {world_size} processes: every '
                         'process needs a part of it (quant_cfg.calib.batch_size >= world size)')
    if not positions:
        return None
    return _take(batch, positions, n)


class UnshardedSampler(DefaultSampler):
    """mmengine's ``DefaultSampler`` as one process sees it, on every rank: all ranks walk the
    single-process sample order (same seed, same indices)."""

    def __init__(self, dataset, shuffle=True, seed=None, round_up=True):
        super().__init__(dataset, shuffle=shuffle, seed=seed, round_up=round_up)
        self.rank, self.world_size = 0, 1
        self.num_samples = self.total_size = len(self.dataset)


def read_global_stream(loader_cfg, seed):
    """Make a calibration dataloader config read the single-process stream on every rank.

    Every rank then loads the same images with the same augmentation draws (the sampler
    ignores the world size; dataloader workers are seeded as rank 0's), and keeps its
    part of each batch with :func:`shard_batch`: the union over ranks is the
    single-process calibration set, augmentation included. The price is that each rank
    loads all ``num_samples`` images (not ``num_samples / W``); decoding is cheap next to
    reconstruction. No-op in single-process runs.
    """
    if not is_sharded():
        return loader_cfg
    from mmengine.dataset.utils import worker_init_fn
    sampler = dict(loader_cfg.get('sampler') or {})
    sampler['type'] = UnshardedSampler
    loader_cfg['sampler'] = sampler
    if loader_cfg.get('num_workers', 0) > 0 and 'worker_init_fn' not in loader_cfg:
        loader_cfg['worker_init_fn'] = dict(type=worker_init_fn, num_workers=loader_cfg['num_workers'],
                                            rank=0, seed=seed)
    return loader_cfg


def global_sum(*values):
    """Sums of Python numbers over ranks (one collective); the values themselves on one process."""
    if not is_sharded():
        return values if len(values) > 1 else values[0]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce(t, 'sum')
    out = tuple(t.tolist())
    return out if len(out) > 1 else out[0]


def global_max(values):
    """Element-wise maxima of a tuple of numbers over ranks (one collective)."""
    if not is_sharded():
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce(t, 'max')
    return type(values)(type(v)(r) for v, r in zip(values, t.tolist()))


def main_then_barrier(fn):
    """Decorator: ``fn`` runs on rank 0 only (files, plots); the others wait for it at a barrier."""
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs) if is_main_process() else None
        if is_sharded():
            barrier()
        return result
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


# -- activation ranges ---------------------------------------------------------------------
class ShardReducer:
    """How a quantizer's range statistics combine when each process holds its part of the
    first calibration batch (``UniformQuantizer.init_range(x, reducer)``): the min/max and
    the Lp errors are all-reduced, and large inputs are subsampled at the positions one
    process would keep on the whole batch, so every rank picks what one process picks (up
    to the order of the floating-point sums).

    Args:
        n_local: samples in this rank's part of the batch (:func:`shard_batch`).
    """

    def __init__(self, n_local):
        self.n_local = n_local

    @classmethod
    def for_batch(cls, batch):
        """The reducer for this rank's part ``batch`` of a global batch; ``None`` in a
        single-process run (local statistics)."""
        return cls(batch_size(batch)) if is_sharded() else None

    def subsample(self, v, x, ch_axis, max_elements):
        if ch_axis not in (None, 1):
            raise NotImplementedError(f'sharded range initialisation supports per-tensor or channel axis 1, '
                                      f'got {ch_axis}')
        total = int(self.sum_(torch.tensor([float(v.shape[1])], dtype=torch.float64, device=v.device)).item())
        if total <= max_elements:
            return v
        stride = -(-total // max_elements)
        rank, world_size = get_dist_info()
        pos = _global_positions(x, ch_axis, self.n_local or x.shape[0], rank, world_size)
        return v[:, pos % stride == 0]

    def min_(self, t):
        all_reduce(t, 'min')
        return t

    def max_(self, t):
        all_reduce(t, 'max')
        return t

    def sum_(self, t):
        all_reduce(t, 'sum')
        return t


def _global_positions(x, ch_axis, n_local, rank, world_size):
    """Position of every element of the local channel view (C, K_local) in the row of the
    *global* channel view (what one process would build from the whole first batch).

    Local sample ``k`` is global sample ``k * W + rank`` of the first calibration batch;
    a sample may own several rows of ``x`` (a RoI head's proposals).
    """
    rows = x.shape[0]
    per_sample = rows // max(1, n_local)
    per_row = x[0].numel() if ch_axis is None else x[0].numel() // x.shape[ch_axis]
    t = torch.arange(rows, device=x.device)
    g_row = ((t // per_sample) * world_size + rank) * per_sample + t % per_sample
    pos = g_row[:, None] * per_row + torch.arange(per_row, device=x.device)[None, :]
    return pos.reshape(-1)  # the same (row, rest) order as every channel of the view


# -- launchers on CPU ------------------------------------------------------------------------
def init_cpu_dist(launcher, backend='gloo', **kwargs):
    """Initialise the process group for ``--launcher pytorch|slurm|mpi`` on a machine without
    CUDA.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` for these launchers, which fails
    without a GPU; this sets up the same environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and a gloo group, after which the
    Runner skips its own initialisation. Returns False (and does nothing) when CUDA is
    available, when ``launcher`` is ``'none'`` or when a group exists already.
    """
    import torch.distributed as torch_dist
    if launcher == 'none' or torch.cuda.is_available() or torch_dist.is_initialized():
        return False
    if launcher == 'slurm':
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            node_list = os.environ['SLURM_NODELIST']
            os.environ['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    elif launcher == 'mpi':
        os.environ['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
        os.environ['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
        os.environ['LOCAL_RANK'] = os.environ['OMPI_COMM_WORLD_LOCAL_RANK']
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', '29500')
    elif launcher != 'pytorch':
        raise ValueError(f'unknown launcher {launcher!r}')
    torch_dist.init_process_group(backend=backend, **kwargs)
    return True


def prepare_launcher(cfg):
    """Before ``Runner.from_cfg(cfg)`` in ``tools/ptq.py``: on a machine without CUDA, set up the
    gloo group for ``cfg.launcher`` (:func:`init_cpu_dist`) and let the Runner's
    ``MMDistributedDataParallel`` wrap a CPU model (``device_ids=None``; PTQ never runs a
    DDP forward, the wrapper only carries the model). With CUDA, mmengine does everything."""
    launcher = cfg.get('launcher', 'none')
    timeout = ((cfg.get('env_cfg') or {}).get('dist_cfg') or {}).get('timeout')
    kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
    if not init_cpu_dist(launcher, **kwargs):
        return False
    wrapper = dict(cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel'))
    if 'DistributedDataParallel' in str(wrapper.get('type')):
        wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    return True
