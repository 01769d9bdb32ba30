"""``mmbrecq.utils.dist``: the layout of the calibration set over ranks, and the calibration
builder of the PTQ loop on 2 CPU processes (the union of the ranks' batches is the
single-process calibration set, augmentation included, with and without dataloader workers).
"""
import copy
import types

import pytest
import torch

from mmbrecq.utils.dist import UnshardedSampler, shard_batch, shard_positions, shard_size

from _dist import spawn

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# layout helpers (no process needed)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('world_size', [2, 3, 8])
def test_shards_partition_the_global_set_in_order(world_size):
    sizes = [8, 8, 5, 3]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    n = sum(sizes)
    for rank in range(world_size):
        local = [o + p for o, s in zip(offsets, sizes) for p in shard_positions(o, s, rank, world_size)]
        assert local == list(range(rank, n, world_size))         # global i -> rank i % W, local i // W
        assert len(local) == shard_size(n, rank, world_size)


def test_unsharded_sampler_gives_the_single_process_order_on_every_rank():
    from mmengine.dataset import DefaultSampler
    data = list(range(37))
    ref = list(DefaultSampler(data, shuffle=True, seed=3))
    s = UnshardedSampler(data, shuffle=True, seed=3)
    assert list(s) == ref and len(s) == 37


def test_single_process_shard_batch_is_the_identity():
    b = torch.randn(5, 2)
    assert shard_batch(b, 0) is b


def _calibration(rank, world_size, num_workers):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmpretrain.models import ClsDataPreprocessor

    import mmbrecq  # noqa: F401
    from mmbrecq.engine.calibration import build_calibration_set
    init_default_scope('mmpretrain')
    base = Config.fromfile('configs/_base_/digits_resnet_float.py')
    loader = copy.deepcopy(base.train_dataloader)   # RandomCrop augmentation: random per sample
    loader.update(num_workers=num_workers, persistent_workers=False)
    runner = types.SimpleNamespace(cfg=Config(dict(train_dataloader=loader)),
                                   build_dataloader=Runner.build_dataloader)
    model = types.SimpleNamespace(data_preprocessor=ClsDataPreprocessor(mean=[77.94] * 3, std=[82.5] * 3))
    calib = build_calibration_set(runner, model, dict(num_samples=19, batch_size=6, split='train', seed=3))
    return dict(inputs=torch.cat([b['inputs'] for b in calib.batches]), sizes=calib.sizes,
                labels=[int(s.gt_label) for b in calib.batches for s in b['data_samples']])


@pytest.mark.parametrize('num_workers', [0, pytest.param(2, marks=pytest.mark.slow)])  # workers: 35-50 s
def test_calibration_shards_are_the_single_process_set(num_workers, tmp_path):
    single = _calibration(0, 1, num_workers)
    ranks = spawn(_calibration, 2, tmp_path, num_workers)
    assert single['sizes'] == [6, 6, 6, 1]
    assert ranks[0]['sizes'] == [3, 3, 3, 1] and ranks[1]['sizes'] == [3, 3, 3]  # the last batch: rank 0 only
    for r, out in enumerate(ranks):
        assert torch.equal(out['inputs'], single['inputs'][r::2])      # same images, same augmentation
        assert out['labels'] == single['labels'][r::2]
