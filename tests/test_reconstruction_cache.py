"""CacheBudget placement (device / host / disk memmap) and SampleCache round trips."""
import os

import numpy as np
import pytest
import torch

from mmbrecq.reconstruction import CacheBudget, SampleCache

torch.set_num_threads(1)

SHAPE = (10, 3, 4, 4)                       # (N, *sample shape)
NBYTES = int(np.prod(SHAPE)) * 4            # float32
GB = 2**30


def _bins(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith('.bin'))


def _data(shape=SHAPE, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------
# placement and accounting
# ---------------------------------------------------------------------------------------
def test_host_when_it_fits(tmp_path):
    budget = CacheBudget('cpu', host_gb=1, disk_dir=tmp_path)
    assert budget.place(NBYTES) == 'host'
    cache = budget.allocate(SHAPE, name='x')
    assert isinstance(cache, SampleCache)
    assert cache.where == 'host' and cache.nbytes == NBYTES
    assert cache.data.device.type == 'cpu' and tuple(cache.data.shape) == SHAPE
    assert len(cache) == SHAPE[0]
    assert budget.used == {'device': 0, 'host': NBYTES, 'disk': 0}
    assert _bins(tmp_path) == []             # nothing written to disk
    cache.free()
    assert budget.used == {'device': 0, 'host': 0, 'disk': 0}
    assert cache.data is None


def test_disk_memmap_when_host_budget_is_zero(tmp_path):
    budget = CacheBudget('cpu', host_gb=0, disk_dir=tmp_path)
    assert budget.place(1) == 'disk'
    cache = budget.allocate(SHAPE, name='x_q0')
    assert cache.where == 'disk'
    assert budget.used == {'device': 0, 'host': 0, 'disk': NBYTES}
    files = _bins(tmp_path)
    assert len(files) == 1 and files[0].startswith('mmbrecq_x_q0_')
    path = os.path.join(str(tmp_path), files[0])
    assert os.path.getsize(path) == NBYTES
    # the tensor really is backed by the file: what is written lands in it
    x = _data()
    cache.write(0, x)
    on_disk = np.fromfile(path, dtype=np.float32).reshape(SHAPE)
    np.testing.assert_array_equal(on_disk, x.numpy())
    assert 'disk' in cache.describe() and 'x_q0' in cache.describe()
    cache.free()
    assert not os.path.exists(path)
    assert _bins(tmp_path) == []
    assert budget.used == {'device': 0, 'host': 0, 'disk': 0}


def test_spills_to_disk_once_host_budget_is_used_up(tmp_path):
    budget = CacheBudget('cpu', host_gb=1.5 * NBYTES / GB, disk_dir=tmp_path)
    a = budget.allocate(SHAPE, name='a')
    b = budget.allocate(SHAPE, name='b')   # a second one does not fit in the host budget
    assert (a.where, b.where) == ('host', 'disk')
    assert budget.used == {'device': 0, 'host': NBYTES, 'disk': NBYTES}
    assert len(_bins(tmp_path)) == 1
    a.free()
    c = budget.allocate(SHAPE, name='c')   # room again on the host
    assert c.where == 'host'
    for cache in (b, c):
        cache.free()
    assert budget.used == {'device': 0, 'host': 0, 'disk': 0}
    assert _bins(tmp_path) == []


def test_free_twice_does_not_release_twice(tmp_path):
    budget = CacheBudget('cpu', host_gb=1, disk_dir=tmp_path)
    keep = budget.allocate(SHAPE, name='keep')
    gone = budget.allocate(SHAPE, name='gone')
    gone.free()
    gone.free()
    assert budget.used['host'] == NBYTES      # not 0, not negative
    keep.free()
    assert budget.used['host'] == 0


def test_cpu_budget_never_places_on_device():
    budget = CacheBudget('cpu', device_gb=100, host_gb=0)
    assert budget.device_bytes == 0
    assert budget.place(1) == 'disk'
    assert CacheBudget('cpu', device_gb=100, host_gb=1).place(1) == 'host'


def test_placement_order_device_host_disk():
    """Accelerator budget first, then host, then disk (pure bookkeeping: 'meta' device)."""
    budget = CacheBudget('meta', device_gb=1000 / GB, host_gb=1000 / GB)
    assert budget.device_bytes == 1000 and budget.host_bytes == 1000
    assert budget.place(800) == 'device'
    budget.used['device'] = 800
    assert budget.place(300) == 'host'       # would overflow the device budget
    assert budget.place(200) == 'device'     # still fits exactly
    budget.used['host'] = 900
    assert budget.place(300) == 'disk'


# ---------------------------------------------------------------------------------------
# write / read / gather round trips on every placement
# ---------------------------------------------------------------------------------------
PLACEMENTS = ['host', 'disk'] + (['device'] if torch.cuda.is_available() else [])


def _budget(where, tmp_path):
    if where == 'device':
        return CacheBudget('cuda', device_gb=1, host_gb=0, disk_dir=tmp_path)
    return CacheBudget('cpu', host_gb=1 if where == 'host' else 0, disk_dir=tmp_path)


@pytest.mark.parametrize('where', PLACEMENTS)
def test_round_trip(where, tmp_path):
    budget = _budget(where, tmp_path)
    cache = budget.allocate(SHAPE, name='rt')
    assert cache.where == where
    x = _data()
    # written chunk by chunk, as the captures do (uneven chunks)
    for start, stop in ((0, 4), (4, 7), (7, 10)):
        cache.write(start, x[start:stop])
    dev = budget.device
    got = cache.read(0, SHAPE[0])
    assert got.device.type == dev.type
    assert torch.equal(got.cpu(), x)
    assert torch.equal(cache.read(3, 8).cpu(), x[3:8])
    idx = torch.tensor([9, 0, 3, 3, 7])
    g = cache.gather(idx.to(dev) if where == 'device' else idx)
    assert g.device.type == dev.type
    assert torch.equal(g.cpu(), x[idx])
    # an index on the host works whatever the placement
    assert torch.equal(cache.gather(idx).cpu(), x[idx])
    # the optimisation loop's reused batch buffer: same values, one buffer per batch size
    first = cache.gather(idx, reuse=True)
    again = cache.gather(idx.flip(0), reuse=True)
    assert torch.equal(again.cpu(), x[idx.flip(0)])
    if dev.type == 'cpu' or where == 'device':
        assert again.data_ptr() == first.data_ptr()          # the previous batch is overwritten
        assert torch.equal(first.cpu(), x[idx.flip(0)])
        assert cache.gather(idx).data_ptr() != again.data_ptr()  # without reuse: a fresh tensor
    assert torch.equal(cache.gather(idx[:2], reuse=True).cpu(), x[idx[:2]])  # another size
    cache.free()
    assert budget.used == {'device': 0, 'host': 0, 'disk': 0}
    assert _bins(tmp_path) == []


@pytest.mark.parametrize('where', PLACEMENTS)
def test_write_detaches_and_converts(where, tmp_path):
    budget = _budget(where, tmp_path)
    cache = budget.allocate((4, 5), name='w')
    src = torch.randn(4, 5, dtype=torch.float64, requires_grad=True) * 2
    cache.write(0, src)                      # a tensor in a graph, another dtype
    out = cache.read(0, 4)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out.cpu(), src.detach().float())
    cache.free()


@pytest.mark.parametrize('where', PLACEMENTS)
def test_overwrite_keeps_other_rows(where, tmp_path):
    budget = _budget(where, tmp_path)
    cache = budget.allocate((6, 2), name='o')
    x = _data((6, 2), seed=1)
    cache.write(0, x)
    y = _data((2, 2), seed=2)
    cache.write(2, y)
    expect = x.clone()
    expect[2:4] = y
    assert torch.equal(cache.read(0, 6).cpu(), expect)
    cache.free()


def test_describe_mentions_size_and_place(tmp_path):
    budget = CacheBudget('cpu', host_gb=1, disk_dir=tmp_path)
    cache = budget.allocate((2**18, ), name='fisher0')   # 1 MiB of float32
    text = cache.describe()
    assert text.startswith('fisher0[262144]') and '1.0 MiB' in text and 'host' in text
    cache.free()


# ---------------------------------------------------------------------------------------
# rows per sample (a two-stage detector's RoI head: images x proposals rows)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('where', PLACEMENTS)
def test_rows_keep_each_samples_rows_together(where, tmp_path):
    budget = _budget(where, tmp_path)
    rows = 3
    cache = budget.allocate((5, 4), name='roi', rows=rows)      # 5 images, 3 RoIs each, 4 features
    assert cache.shape == (5, 3, 4) and cache.row_shape == (4, ) and len(cache) == 5
    assert cache.nbytes == 5 * 3 * 4 * 4
    x = _data((15, 4), seed=3)                                  # what the unit sees: 15 rows
    cache.write(0, x[:6])                                       # batch of 2 images
    cache.write(2, x[6:])                                       # batch of 3 images
    assert torch.equal(cache.read(0, 5).cpu(), x)
    assert torch.equal(cache.read(1, 3).cpu(), x[3:9])
    idx = torch.tensor([4, 0])
    expect = torch.cat([x[12:15], x[0:3]])
    assert torch.equal(cache.gather(idx).cpu(), expect)
    cache.free()
    assert budget.used == {'device': 0, 'host': 0, 'disk': 0}
