"""Calibration-set options: validation, padding to one size (detection pipelines keep the
aspect ratio), and the forward / task loss chosen for classifiers and detectors."""
import pytest
import torch

from mmbrecq.config import calib_config
from mmbrecq.engine.calibration import pad_batches


class _Sample:
    def __init__(self, shape):
        self.metainfo = dict(batch_input_shape=shape, pad_shape=shape)

    def set_metainfo(self, meta):
        self.metainfo.update(meta)


def _batch(h, w, n=2):
    return dict(inputs=torch.ones(n, 3, h, w), data_samples=[_Sample((h, w)) for _ in range(n)])


@pytest.mark.parametrize('bad, key', [
    (dict(pad_to='min'), 'pad_to'), (dict(pad_to=(32, )), 'pad_to'), (dict(pad_to=(32, -1)), 'pad_to'),
    (dict(num_proposals=0), 'num_proposals'), (dict(num_proposals=1.5), 'num_proposals')])
def test_bad_values_name_the_key(bad, key):
    with pytest.raises(ValueError, match=f'quant_cfg.calib.{key}'):
        calib_config(bad)


def test_defaults():
    c = calib_config(None)
    assert c['pad_to'] == 'max' and c['num_proposals'] == 256
    assert calib_config(dict(pad_to=None))['pad_to'] is None
    assert calib_config(dict(pad_to=[64, 96]))['pad_to'] == [64, 96]


def test_pad_to_max_pads_bottom_right_and_updates_metainfo():
    batches = pad_batches([_batch(32, 64), _batch(64, 32), _batch(64, 64)], 'max', pad_value=-1.)
    assert all(b['inputs'].shape[-2:] == (64, 64) for b in batches)
    x = batches[0]['inputs']
    assert bool((x[..., :32, :] == 1).all()) and bool((x[..., 32:, :] == -1).all())
    assert all(s.metainfo['batch_input_shape'] == (64, 64) and s.metainfo['pad_shape'] == (64, 64)
               for b in batches for s in b['data_samples'])


def test_pad_to_fixed_size_and_too_small_is_an_error():
    batches = pad_batches([_batch(32, 40)], (48, 48))
    assert batches[0]['inputs'].shape[-2:] == (48, 48)
    with pytest.raises(ValueError, match='quant_cfg.calib.pad_to'):
        pad_batches([_batch(64, 40)], (48, 48))


def test_no_padding_when_sizes_match_or_disabled():
    b = _batch(32, 32)
    x = b['inputs']
    assert pad_batches([b], 'max')[0]['inputs'] is x
    odd = [_batch(32, 32), _batch(16, 16)]
    assert [t['inputs'].shape[-1] for t in pad_batches(odd, None)] == [32, 16]
