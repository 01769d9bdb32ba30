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
from mmengine.dist import all_reduce, barrier, get_rank, get_world_size

__all__ = ['world', 'is_main', 'is_sharded', 'shard_size', 'shard_positions', 'shard_batch', 'UnshardedSampler',
           'read_global_stream', 'global_sum', 'global_max', 'main_then_barrier', 'shard_range_init',
           'sharded_range', 'init_cpu_dist', 'prepare_launcher']


def world():
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    return get_rank(), get_world_size()


def is_main():
    """True on rank 0 (and without a process group)."""
    return get_rank() == 0


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
        rank, world_size = world()
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
    initialised on it (the reduction in :func:`sharded_range` rebuilds the global batch).
    """
    rank, world_size = world()
    if world_size == 1:
        return batch
    if n is None:
        from mmbrecq.reconstruction.capture import batch_size
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
        result = fn(*args, **kwargs) if get_rank() == 0 else None
        if is_sharded():
            barrier()
        return result
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


# -- activation ranges ---------------------------------------------------------------------
def shard_range_init(quantizers, batch):
    """Tell activation quantizers that ``batch`` is this rank's part of a global calibration
    batch (their :meth:`init_range` then reduces over ranks); ``batch=None`` or one process:
    back to local statistics."""
    n = None
    if batch is not None and is_sharded():
        from mmbrecq.reconstruction.capture import batch_size
        n = batch_size(batch)
    for q in quantizers:
        q.shard_samples = n


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


@torch.no_grad()
def sharded_range(x, q, n_local=None, max_elements=1 << 18):
    """``(lo, hi)`` that ``q.init_range`` computes on the global batch, from this rank's part.

    Min-max: all-reduced min and max. Lp search: the same element subsampling as one
    process (positions of the global batch, kept on the rank that holds them), reduced
    min/max of the kept elements, then the per-candidate Lp error sums all-reduced in one
    collective so that every rank picks the same candidate. The result equals the
    single-process one up to the order of the floating-point sums.
    """
    from mmbrecq.quantizers.functional import lp_error, qparams_from_range
    from mmbrecq.quantizers.range_search import _channel_view
    rank, world_size = world()
    ch_axis = q.ch_axis
    if ch_axis not in (None, 1):
        raise NotImplementedError(f'sharded range initialisation supports per-tensor or channel axis 1, got {ch_axis}')
    v = _channel_view(x.detach().float(), ch_axis)
    if q.init != 'lp':
        lo = v.min(dim=1).values if v.shape[1] else torch.full(v.shape[:1], float('inf'), device=v.device)
        hi = v.max(dim=1).values if v.shape[1] else torch.full(v.shape[:1], -float('inf'), device=v.device)
        all_reduce(lo, 'min')
        all_reduce(hi, 'max')
        return (lo[0], hi[0]) if ch_axis is None else (lo, hi)
    counts = torch.tensor([float(v.shape[1])], dtype=torch.float64, device=v.device)
    all_reduce(counts, 'sum')
    total = int(counts.item())
    if total > max_elements:
        stride = -(-total // max_elements)
        pos = _global_positions(x, ch_axis, n_local or x.shape[0], rank, world_size)
        v = v[:, pos % stride == 0]
    inf = torch.full(v.shape[:1], float('inf'), device=v.device)
    lo0 = v.min(dim=1).values if v.shape[1] else inf
    hi0 = v.max(dim=1).values if v.shape[1] else -inf
    all_reduce(lo0, 'min')
    all_reduce(hi0, 'max')
    n = q.num_candidates
    errs, cands = [], []
    for i in range(n):
        c = 1.0 - i / n
        lo, hi = lo0 * c, hi0 * c
        scale, zp = qparams_from_range(lo, hi, q.qmin, q.qmax, q.symmetric)
        s, z = scale[:, None], zp[:, None]
        xq = (torch.clamp(torch.round(v / s) + z, q.qmin, q.qmax) - z) * s
        errs.append(lp_error(v, xq, q.p, dim=1))
        cands.append((lo, hi))
    err = torch.stack(errs)            # (candidates, channels): one collective for all of them
    all_reduce(err, 'sum')
    best_err = torch.full_like(lo0, float('inf'))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i, (lo, hi) in enumerate(cands):  # the single-process selection: first strict minimum
        better = err[i] < best_err
        best_err = torch.where(better, err[i], best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return (best_lo[0], best_hi[0]) if ch_axis is None else (best_lo, best_hi)


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
