"""All-or-nothing outputs and the work-dir lock (``mmbrecq.utils.io``)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmengine.config import ConfigDict

from mmbrecq.utils import (
    InputError,
    WorkDirBusy,
    WorkDirLock,
    atomic_json_dump,
    atomic_path,
    atomic_save,
    make_work_dir,
    to_plain,
)

ROOT = Path(__file__).resolve().parents[1]


def _good(path):
    atomic_save({'w': torch.arange(10.)}, path)
    return path.read_bytes()


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / 'quantized.pth'
    _good(path)
    atomic_save({'w': torch.ones(3)}, path)
    torch.testing.assert_close(torch.load(str(path), weights_only=True)['w'], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ['quantized.pth']


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / 'summary.json'
    atomic_json_dump({'ok': 1}, path)
    with pytest.raises(TypeError):
        atomic_json_dump({'bad': object()}, path)  # fails half-way through writing
    assert json.loads(path.read_text()) == {'ok': 1}
    assert sorted(os.listdir(tmp_path)) == ['summary.json']
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / 'model.onnx') as tmp:
            Path(tmp).write_bytes(b'half')
            raise RuntimeError('writer died')
    assert sorted(os.listdir(tmp_path)) == ['summary.json']


def test_kill_during_save_leaves_previous_good_file(tmp_path):
    """A process SIGKILLed in the middle of writing (after a part of the bytes reached the
    disk) leaves the previous file intact and loadable."""
    path = tmp_path / 'quantized.pth'
    before = _good(path)
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from mmbrecq.utils.io import atomic_save
        real_save = torch.save
        def dying_save(obj, f):
            real_save(obj, f)
            with open(f, 'r+b') as fh:  # half of the bytes, then the kill
                fh.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_save({{'w': torch.randn(100000)}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert path.read_bytes() == before
    torch.testing.assert_close(torch.load(str(path), weights_only=True)['w'], torch.arange(10.))


def test_to_plain_makes_configs_weights_only_loadable(tmp_path):
    cfg = ConfigDict(w_bits=4, recon=dict(iters=2, b_range=(20, 2)), keep_8bit=['first'])
    path = tmp_path / 'x.pth'
    torch.save({'quant_cfg': cfg}, str(path))
    with pytest.raises(Exception):  # the premise: a ConfigDict needs the full unpickler
        torch.load(str(path), weights_only=True)
    atomic_save({'quant_cfg': to_plain(cfg)}, path)
    out = torch.load(str(path), weights_only=True)['quant_cfg']
    assert out == {'w_bits': 4, 'recon': {'iters': 2, 'b_range': (20, 2)}, 'keep_8bit': ['first']}
    assert type(out['recon']) is dict


def test_work_dir_lock_refuses_a_second_holder(tmp_path):
    with WorkDirLock(tmp_path):
        with pytest.raises(WorkDirBusy) as e:
            WorkDirLock(tmp_path).acquire()
        assert str(tmp_path) in str(e.value) and str(os.getpid()) in str(e.value)
        assert '--work-dir' in str(e.value)
    with WorkDirLock(tmp_path):  # released at the end of the block
        pass


def test_work_dir_lock_released_when_holder_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from mmbrecq.utils.io import WorkDirLock
        WorkDirLock({str(tmp_path)!r}).acquire()
        print('locked', flush=True)
        sys.stdin.read()  # holds the lock until killed
    """)
    proc = subprocess.Popen([sys.executable, '-c', script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b'locked'
        with pytest.raises(WorkDirBusy) as e:
            WorkDirLock(tmp_path).acquire()
        assert str(proc.pid) in str(e.value)
    finally:
        proc.kill()
        proc.wait()
    with WorkDirLock(tmp_path):  # the OS released it with the process
        pass


def test_make_work_dir_under_a_regular_file(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(InputError) as e:
        make_work_dir(tmp_path / 'file' / 'work')
    assert str(tmp_path / 'file' / 'work') in str(e.value) and '--work-dir' in str(e.value)
    make_work_dir(tmp_path / 'a' / 'b')
    assert (tmp_path / 'a' / 'b').is_dir()
