"""The fused kernels' build: a killed run never blocks the next, and the build is keyed by
the sources' content (``mmbrecq.ops.build``)."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmbrecq.ops import build, cpu_kernels

ROOT = Path(__file__).resolve().parents[1]


def _holder(lock_dir, also_torch_lock=False):
    """A process that takes our build lock (and creates torch's lock file, as load() would)
    and holds it until killed; returns once it holds it."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / 'mmbrecq' / 'ops')!r})
        import build
        with build.build_lock({str(lock_dir)!r}):
            if {also_torch_lock!r}:
                open(os.path.join({str(lock_dir)!r}, build.TORCH_LOCK_FILE), 'w').close()
            print('locked', flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, '-c', script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b'locked'
    return proc


def test_name_depends_on_content_not_path(tmp_path):
    src = ROOT / 'mmbrecq' / 'ops' / 'csrc' / 'fused_quant.cpp'
    copy = tmp_path / 'checkout2' / 'fused_quant.cpp'
    copy.parent.mkdir()
    shutil.copy(src, copy)
    name = build.extension_name('ext', [src], ['-O3'])
    assert build.extension_name('ext', [copy], ['-O3']) == name  # another checkout, same build
    copy.write_text(copy.read_text() + '\n// changed\n')
    assert build.extension_name('ext', [copy], ['-O3']) != name  # changed sources, own build
    assert build.extension_name('ext', [src], ['-O2']) != name  # other flags too


def test_staged_sources_are_the_same_path_for_every_checkout(tmp_path):
    a, b = tmp_path / 'a' / 'k.cpp', tmp_path / 'b' / 'k.cpp'
    for p in (a, b):
        p.parent.mkdir()
        p.write_text('int x;\n')
    build_dir = tmp_path / 'build'
    build_dir.mkdir()
    assert build.staged_sources(str(build_dir), [str(a)]) == build.staged_sources(str(build_dir), [str(b)])
    assert (build_dir / 'src' / 'k.cpp').read_text() == 'int x;\n'


def test_stale_torch_lock_of_a_killed_run_is_removed(tmp_path):
    """SIGKILL while torch's lock file exists: the next build goes ahead at once."""
    proc = _holder(tmp_path, also_torch_lock=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / build.TORCH_LOCK_FILE).exists()  # left behind, as after a kill inside load()
    warnings = []
    with build.build_lock(str(tmp_path), timeout=0, warn=warnings.append):
        assert not (tmp_path / build.TORCH_LOCK_FILE).exists()
    assert warnings and str(tmp_path / build.TORCH_LOCK_FILE) in warnings[0]


def test_living_holder_times_out_naming_the_directory(tmp_path):
    proc = _holder(tmp_path, also_torch_lock=True)
    try:
        with pytest.raises(TimeoutError) as e:
            with build.build_lock(str(tmp_path), timeout=0.2, poll=0.05):
                pass
        assert str(tmp_path) in str(e.value) and str(proc.pid) in str(e.value)
        assert build.TIMEOUT_ENV in str(e.value)
        assert (tmp_path / build.TORCH_LOCK_FILE).exists()  # a living build's lock is left alone
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(cpu_kernels._disabled_by_env(), reason='kernels disabled by MMBRECQ_CPU_KERNELS=0')
def test_kernels_load_after_a_killed_run(tmp_path):
    """End to end in a fresh process: the build directory holds torch's lock file of a killed
    run; loading the kernels removes it and succeeds (before: it waited forever)."""
    assert cpu_kernels.cpu_kernels_available(), cpu_kernels.unavailable_reason()  # built here once
    name = build.extension_name(cpu_kernels._NAME, [cpu_kernels._SOURCE], cpu_kernels._CFLAGS + cpu_kernels._LDFLAGS)
    build_dir = Path(build.build_directory(name))
    (build_dir / build.TORCH_LOCK_FILE).write_text('')
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from mmbrecq.ops import cpu_kernels
        assert cpu_kernels.get_cpu_kernels() is not None, cpu_kernels.unavailable_reason()
        print('loaded', flush=True)
    """)
    env = dict(os.environ, **{build.TIMEOUT_ENV: '600'})
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and 'loaded' in out.stdout, out.stderr[-3000:]
    assert not (build_dir / build.TORCH_LOCK_FILE).exists()
