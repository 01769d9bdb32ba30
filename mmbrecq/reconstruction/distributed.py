"""Reconstruction steps on several processes, equal to the single-process steps.

Each rank holds its shard of every unit cache (global sample ``i`` on rank ``i % W`` as
local sample ``i // W``, see :mod:`mmbrecq.utils.dist`). Per step:

* every rank draws the *global* batch of indices from the same seeded generator as one
  process would (same generator device on every rank) and keeps the indices it holds;
* the unit's loss on those samples is normalised by the *global* batch
  (``rec_local * n_local / batch_size``: the loss is a mean over the batch) and the
  rounding regulariser, which every rank computes in full, enters with weight ``1 / W``;
* the gradients of AdaRound's alpha and the LSQ steps are summed over ranks in one
  all-reduce, so every rank applies the single-process gradient of the global batch and
  Adam keeps the parameters identical on all ranks (up to float summation order);
* the logged loss history is summed over ranks at every finiteness check (so that all
  ranks fail together on a non-finite loss), which gives the global batch's losses.

At the end of a unit, rank 0's quantization parameters are broadcast (a guard: they are
equal already). QDrop masks are drawn per rank with a rank-dependent seed: they are
independent across the global batch as in one process, but not the same draws.
With one process every method here is the identity and no collective runs.
"""
import torch
from mmengine.dist import all_reduce, broadcast, get_dist_info

from mmbrecq.modules import quantizers_of
from mmbrecq.utils.dist import shard_size

#: seed offset between ranks for the QDrop masks (a prime, so rank seeds never collide
#: with the per-unit seeds ``seed + unit_index`` of nearby units)
RANK_SEED_STRIDE = 1000003


class StepSharding:
    """This rank's part of the global batches of one optimisation stage, and its collectives.

    Args:
        data: the unit's :class:`UnitData` (its caches hold this rank's shard).
        batch_size: the global batch size (``quant_cfg.recon.batch_size``).
    """

    def __init__(self, data, batch_size):
        self.rank, self.world_size = get_dist_info()
        self.batch_size = batch_size
        self.total = data.num_samples
        self.index_device = data.index_device
        self._reduced = 0
        if self.world_size == 1:
            return
        # global sample count, and whether some rank keeps its caches (hence its indices) on the host
        info = torch.tensor([data.num_samples, float(data.index_device.type == 'cpu')], dtype=torch.float64)
        all_reduce(info, 'sum')
        self.total = int(info[0])
        # every rank fails together when a shard does not have the size the layout gives it
        bad = torch.tensor([float(shard_size(self.total, self.rank, self.world_size) != data.num_samples)])
        all_reduce(bad, 'sum')
        if bad.item():
            raise ValueError(f'the calibration caches are not split as global sample i -> rank i % '
                             f'{self.world_size} ({self.total} samples in all, {data.num_samples} here)')
        if info[1] > 0:  # the index generator must be the same kind on every rank
            self.index_device = torch.device('cpu')

    @property
    def active(self):
        return self.world_size > 1

    def local(self, idx):
        """Indices of this rank's samples among the global batch ``idx`` (local numbering), and
        their share of the batch."""
        if not self.active:
            return idx, 1.0
        mine = idx[idx % self.world_size == self.rank] // self.world_size
        return mine, mine.numel() / self.batch_size

    def scale(self, rec, reg, share):
        """This rank's terms of the global loss (summed over ranks by :meth:`sync_grads`)."""
        if not self.active:
            return rec, reg
        return rec * share, reg / self.world_size

    def sync_grads(self, params):
        """Sum the gradients over ranks in one all-reduce. A parameter that got no gradient on
        any rank keeps ``grad=None`` (Adam then skips it, as one process would)."""
        if not self.active:
            return
        params = list(params)
        if not params:
            return
        ref = params[0]
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flags = torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)
        buf = torch.cat(flat + [flags])
        all_reduce(buf, 'sum')
        off = 0
        for p in params:
            n = p.numel()
            p.grad = buf[off:off + n].view_as(p)
            off += n
        for p, f in zip(params, buf[off:].tolist()):
            if f == 0:
                p.grad = None

    def reduce_history(self, hist, stop):
        """Sum the rows of the loss history not summed yet, up to ``stop``, over ranks (in place)."""
        if self.active and stop > self._reduced:
            all_reduce(hist[self._reduced:stop], 'sum')
        self._reduced = stop


def mask_seed(seed):
    """Seed of the QDrop masks: ``seed`` on one process, distinct per rank otherwise."""
    rank, world_size = get_dist_info()
    return seed if world_size == 1 else seed + RANK_SEED_STRIDE * rank


@torch.no_grad()
def broadcast_quantizers(*modules):
    """Rank 0's quantization parameters and buffers (alpha, steps, zero points) on every rank."""
    _, world_size = get_dist_info()
    if world_size == 1:
        return
    for module in modules:
        if module is None:
            continue
        for q in quantizers_of(module):  # modules() includes the module itself
            for t in list(q.parameters()) + list(q.buffers()):
                broadcast(t.data, 0)
