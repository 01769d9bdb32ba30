"""The torch-2.9 shims of ``mmbrecq.utils.compat``, each shown to be necessary.

Checkpoint loading: torch >= 2.6 loads with ``weights_only=True`` by default, and
mmengine 0.10.7's local loader does not pass the argument, so the checkpoints mmengine's
own Runner writes (a ``message_hub`` of ``HistoryBuffer`` objects, numpy arrays in
``meta``) cannot be read back. ``import mmbrecq`` registers a local loader that reads
them with ``weights_only=True`` and an allowlist of exactly those types, and refuses
anything else (a pickle payload) unless the file is explicitly trusted.
"""
import os
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
from mmbrecq.utils import CheckpointError, UnsafeCheckpointError, compat, trusted_checkpoints

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
    assert CheckpointLoader._schemes[''] is compat.load_from_local_safe
    assert CheckpointLoader._get_checkpoint_loader(str(path)) is compat.load_from_local_safe
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
    assert original is not compat.load_from_local_safe
    ours = CheckpointLoader._schemes['']
    CheckpointLoader._schemes[''] = original
    try:
        with pytest.raises(pickle.UnpicklingError):
            load_checkpoint(_model(1), str(path), map_location='cpu')
        with pytest.raises(pickle.UnpicklingError):
            _load_checkpoint(str(path))
    finally:
        CheckpointLoader._schemes[''] = ours
    assert CheckpointLoader._schemes[''] is compat.load_from_local_safe
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
    safe loader, and a second call changes nothing."""
    path, ref = runner_ckpt
    schemes = CheckpointLoader._schemes
    monkeypatch.setattr(CheckpointLoader, '_schemes', type(schemes)(schemes))
    CheckpointLoader._schemes[''] = mmengine_checkpoint.load_from_local
    monkeypatch.setattr(compat, '_applied', False)
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(str(path))
    compat.apply()
    assert CheckpointLoader._schemes[''] is compat.load_from_local_safe
    first = list(CheckpointLoader._schemes.items())
    compat.apply()
    assert list(CheckpointLoader._schemes.items()) == first
    _check_contents(_load_checkpoint(str(path)), ref)


# ---------------------------------------------------------------------------------------
# the allowlist: mmengine's types in, everything else out (unless trusted)
# ---------------------------------------------------------------------------------------
class _Payload:
    """Unpickling it creates the marker file: the proof that a load ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_real_runner_checkpoint_loads_weights_only(tmp_path):
    """A checkpoint written by mmengine's own Runner (CheckpointHook after two epochs) reads
    back through the safe loader: the allowlist covers what mmengine writes."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, inputs, labels=None, mode='loss'):
            return dict(loss=((self.fc(inputs).squeeze(-1) - labels) ** 2).mean())

    class Data(torch.utils.data.Dataset):
        metainfo = dict(classes=('a', 'b'))

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return dict(inputs=torch.full((2, ), float(i)), labels=torch.tensor(float(i)))

    runner = Runner(model=Net(), work_dir=str(tmp_path), experiment_name=f'compat_{uuid.uuid4().hex}',
                    train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=True),
                                          batch_size=4, collate_fn=dict(type='default_collate')),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
                    param_scheduler=dict(type='MultiStepLR', milestones=[1]),
                    train_cfg=dict(by_epoch=True, max_epochs=2), randomness=dict(seed=0),
                    default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)))
    runner.train()
    path = tmp_path / 'epoch_2.pth'
    with pytest.raises(pickle.UnpicklingError):  # the premise: torch's own allowlist refuses it
        torch.load(str(path), map_location='cpu', weights_only=True)
    ckpt = compat.load_checkpoint_file(path)
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    assert ckpt['message_hub']['log_scalars']['train/loss'].statistics('mean') > 0
    assert ckpt['meta']['epoch'] == 2 and 'optimizer' in ckpt
    resumed = _load_checkpoint(str(path))  # mmengine's own entry point uses the same loader
    assert resumed['meta']['iter'] == ckpt['meta']['iter']


def test_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {'x': _Payload(marker)}}, str(path))
    with pytest.raises(UnsafeCheckpointError) as e:
        compat.load_checkpoint_file(path, what='quantized checkpoint')
    msg = str(e.value)
    assert 'quantized checkpoint' in msg and str(path) in msg
    assert 'open' in msg  # the refused type is named
    assert '--trust-checkpoint' in msg  # and the explicit opt-in
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):  # mmengine's loaders go through the same check
        _load_checkpoint(str(path))
    assert not marker.exists()


def test_trusted_checkpoints_opt_in_runs_the_full_unpickler(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    torch.save({'x': _Payload(marker)}, str(path))
    with trusted_checkpoints():
        compat.load_checkpoint_file(path)
    assert marker.exists()  # the opt-in is real: that is why it must be explicit
    os.remove(marker)
    with pytest.raises(UnsafeCheckpointError):  # and it ends with the block
        compat.load_checkpoint_file(path)
    assert not marker.exists()


def test_restricted_getattr_of_history_buffer():
    assert compat._history_buffer_getattr(HistoryBuffer, 'min') is HistoryBuffer.min
    for obj, name in ((HistoryBuffer, '__init__'), (HistoryBuffer, 'update'), (os, 'system'),
                      (HistoryBuffer.min, '__globals__')):
        with pytest.raises(pickle.UnpicklingError):
            compat._history_buffer_getattr(obj, name)


_RANDOM = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@pytest.mark.parametrize('content', [b'', _RANDOM, b'PK\x03\x04' + _RANDOM[:100], 'truncated'],
                         ids=['empty', 'random', 'zip-magic', 'truncated'])
def test_not_a_checkpoint_names_the_file(content, tmp_path):
    path = tmp_path / 'float.pth'
    if content == 'truncated':
        torch.save({'w': torch.randn(1000)}, str(path))
        content = path.read_bytes()[:2000]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        compat.load_checkpoint_file(path, what='float checkpoint')
    assert not isinstance(e.value, UnsafeCheckpointError)
    assert 'float checkpoint' in str(e.value) and str(path) in str(e.value)
    assert 'not a readable checkpoint' in str(e.value)


def test_numpy_values_load(tmp_path):
    path = tmp_path / 'np.pth'
    torch.save({'a': np.float32(1.5), 'b': np.arange(3, dtype=np.int16), 'c': np.dtype('float64')}, str(path))
    out = compat.load_checkpoint_file(path)
    assert out['a'] == np.float32(1.5) and out['b'].dtype == np.int16 and out['c'] == np.dtype('float64')
