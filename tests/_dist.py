"""Running a test function on several CPU processes with a gloo process group.

mmengine's ``init_dist`` calls ``torch.cuda.set_device``, so CPU tests set the group up
themselves: ``torch.multiprocessing.spawn`` with a free TCP port. Workers return their
results through files (``out_dir/rank{r}.pth``).
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, out_dir, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pth'))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size, out_dir, *args):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; their return values."""
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_entry, args=(world_size, free_port(), fn, str(out_dir), args), nprocs=world_size, join=True)
    return [torch.load(os.path.join(out_dir, f'rank{r}.pth'), weights_only=False) for r in range(world_size)]
