"""The torch-2.9 shims of ``mmbrecq.utils.compat``, each shown to be necessary.

Checkpoint loading: torch >= 2.6 loads with ``weights_only=True`` by default, and
mmengine 0.10.7's local loader does not pass the argument, so the checkpoints mmengine's
own Runner writes (a ``message_hub`` of ``HistoryBuffer`` objects, numpy arrays in
``meta``) cannot be read back. ``import mmbrecq`` registers a trusted local loader.
"""
import pickle
import uuid

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner import load_checkpoint, save_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint
from torch import nn

import mmbrecq  # noqa: F401  (applies the shims)
from mmbrecq.utils import compat

LOSSES = [0.9, 0.5, 0.25]


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _write_runner_style_checkpoint(path):
    """What mmengine's Runner writes: weights, a message hub state and numpy in ``meta``."""
    model = _model(0)
    hub = MessageHub.get_instance(f'mmbrecq-test-{uuid.uuid4().hex}')
    for it, loss in enumerate(LOSSES):
        hub.update_scalar('train/loss', loss)
        hub.update_info('iter', it)
    hub_state = hub.state_dict()
    # the premise: the hub holds non-tensor objects that weights_only refuses
    assert isinstance(hub_state['log_scalars']['train/loss'], HistoryBuffer)
    save_checkpoint({'state_dict': model.state_dict(), 'message_hub': hub_state,
                     'meta': {'np': np.arange(3), 'epoch': 2}}, str(path))
    return model


@pytest.fixture
def runner_ckpt(tmp_path):
    path = tmp_path / 'epoch_2.pth'
    model = _write_runner_style_checkpoint(path)
    return path, model


def _check_contents(ckpt, ref_model):
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(ckpt['state_dict'][k], v)
    np.testing.assert_array_equal(ckpt['meta']['np'], np.arange(3))
    assert ckpt['meta']['epoch'] == 2
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    assert buf.current() == pytest.approx(LOSSES[-1])
    assert buf.mean() == pytest.approx(np.mean(LOSSES))
    # the state restores a working MessageHub
    hub = MessageHub.get_instance(f'mmbrecq-test-{uuid.uuid4().hex}')
    hub.load_state_dict(ckpt['message_hub'])
    assert hub.get_scalar('train/loss').current() == pytest.approx(LOSSES[-1])
    assert hub.get_info('iter') == len(LOSSES) - 1


def test_plain_torch_load_refuses_runner_checkpoints(runner_ckpt):
    """The premise of the shim: torch 2.9's default is weights_only=True."""
    path, _ = runner_ckpt
    with pytest.raises(pickle.UnpicklingError):
        torch.load(str(path), map_location='cpu')


def test_shim_is_the_registered_local_loader(runner_ckpt):
    path, _ = runner_ckpt
    assert CheckpointLoader._schemes[''] is compat.load_from_local_trusted
    assert CheckpointLoader._get_checkpoint_loader(str(path)) is compat.load_from_local_trusted
    # the other schemes (http, open-mmlab://, ...) are untouched
    assert CheckpointLoader._get_checkpoint_loader('https://x/y.pth') is mmengine_checkpoint.load_from_http


def test_load_checkpoint_reads_runner_checkpoint(runner_ckpt):
    path, ref = runner_ckpt
    model = _model(1)
    assert not torch.equal(model[0].weight, ref[0].weight)
    ckpt = load_checkpoint(model, str(path), map_location='cpu')
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    _check_contents(ckpt, ref)


def test_underscore_load_checkpoint_reads_runner_checkpoint(runner_ckpt):
    path, ref = runner_ckpt
    _check_contents(_load_checkpoint(str(path)), ref)
    _check_contents(_load_checkpoint(str(path), map_location='cpu'), ref)


def test_shim_keeps_mmengine_local_semantics(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        _load_checkpoint(str(tmp_path / 'missing.pth'))
    ref = _write_runner_style_checkpoint(tmp_path / 'ckpt.pth')
    monkeypatch.setenv('HOME', str(tmp_path))
    _check_contents(_load_checkpoint('~/ckpt.pth', map_location='cpu'), ref)
    _check_contents(compat.load_checkpoint_file(str(tmp_path / 'ckpt.pth')), ref)


def test_shim_is_necessary(runner_ckpt):
    """With mmengine's own local loader back in place, the same checkpoint fails to load."""
    path, _ = runner_ckpt
    original = mmengine_checkpoint.load_from_local
    assert original is not compat.load_from_local_trusted
    ours = CheckpointLoader._schemes['']
    CheckpointLoader._schemes[''] = original
    try:
        with pytest.raises(pickle.UnpicklingError):
            load_checkpoint(_model(1), str(path), map_location='cpu')
        with pytest.raises(pickle.UnpicklingError):
            _load_checkpoint(str(path))
    finally:
        CheckpointLoader._schemes[''] = ours
    assert CheckpointLoader._schemes[''] is compat.load_from_local_trusted
    load_checkpoint(_model(1), str(path), map_location='cpu')  # works again


def test_apply_is_idempotent(runner_ckpt):
    path, ref = runner_ckpt
    before = list(CheckpointLoader._schemes.items())
    compat.apply()
    compat.apply()
    mmbrecq.utils.apply_compat()
    after = list(CheckpointLoader._schemes.items())
    assert after == before  # same prefixes, same order, same loaders: nothing re-registered
    assert list(CheckpointLoader._schemes).count('') == 1
    assert compat._applied is True
    _check_contents(_load_checkpoint(str(path)), ref)


def test_apply_installs_shim_once_when_not_applied(runner_ckpt, monkeypatch):
    """From a clean mmengine state (original loader, flag down), apply() installs the
    trusted loader, and a second call changes nothing."""
    path, ref = runner_ckpt
    schemes = CheckpointLoader._schemes
    monkeypatch.setattr(CheckpointLoader, '_schemes', type(schemes)(schemes))
    CheckpointLoader._schemes[''] = mmengine_checkpoint.load_from_local
    monkeypatch.setattr(compat, '_applied', False)
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(str(path))
    compat.apply()
    assert CheckpointLoader._schemes[''] is compat.load_from_local_trusted
    first = list(CheckpointLoader._schemes.items())
    compat.apply()
    assert list(CheckpointLoader._schemes.items()) == first
    _check_contents(_load_checkpoint(str(path)), ref)
