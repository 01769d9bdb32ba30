"""``tools/dist_ptq.sh`` (torchrun, ``tools/ptq.py --launcher pytorch``) with 2 CPU processes
over gloo gives the single-process run of ``tools/ptq.py``: same evaluation metrics (mmengine's
distributed evaluator collects the ranks' halves of the test set), same per-unit losses, same
quantized checkpoint; rank 0 alone writes the work dir.

The digits demo model at tiny settings (32 calibration images, 10 steps per unit). Both runs
are subprocesses with one thread each; about 60-90 s together on 2 shared cores: marked slow.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'brecq' / 'digits_demo_w4a4.py'
OPTIONS = ['quant_cfg.calib.num_samples=32', 'quant_cfg.calib.batch_size=16', 'quant_cfg.recon.iters=10',
           'quant_cfg.recon.batch_size=16', 'quant_cfg.recon.progress=False']


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, **extra)
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def _run(cmd, log, **env):
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), stdout=f, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, Path(log).read_text()[-3000:]


def test_prepare_launcher_is_a_no_op_without_launcher():
    from mmengine.config import Config

    from mmbrecq.utils.dist import prepare_launcher
    cfg = Config(dict(launcher='none'))
    assert prepare_launcher(cfg) is False
    assert cfg.get('model_wrapper_cfg') is None


@pytest.mark.slow
def test_dist_ptq_two_cpu_processes_equal_one(tmp_path):
    from _dist import free_port
    single, dist = tmp_path / 'single', tmp_path / 'dist'
    _run([sys.executable, 'tools/ptq.py', str(CONFIG), '--no-nearest-eval', '--work-dir', str(single),
          '--cfg-options'] + OPTIONS, tmp_path / 'single.log')
    _run(['bash', 'tools/dist_ptq.sh', str(CONFIG), '2', '--no-nearest-eval', '--work-dir', str(dist),
          '--cfg-options'] + OPTIONS, tmp_path / 'dist.log', PORT=str(free_port()))
    a, b = (json.loads((d / 'summary.json').read_text()) for d in (single, dist))
    assert a['metrics'] == b['metrics']                      # fp and brecq top-1, every test image counted once
    for ra, rb in zip(a['units'], b['units']):
        assert ra['name'] == rb['name']
        assert rb['loss_start'] == pytest.approx(ra['loss_start'], rel=1e-5)   # same calibration samples
        assert rb['loss_end'] == pytest.approx(ra['loss_end'], rel=1e-3)
    sa, sb = (torch.load(d / 'quantized.pth', weights_only=True)['state_dict'] for d in (single, dist))
    same = total = 0
    for k, v in sa.items():
        if k.endswith('alpha'):
            same += int(((v >= 0) == (sb[k] >= 0)).sum())
            total += v.numel()
        elif k.endswith('scale'):
            torch.testing.assert_close(sb[k], v, rtol=1e-4, atol=1e-7)
    print(f'\nhard rounding agreement {100 * same / total:.4f} % of {total} weights')
    assert same / total >= 0.999
    # rank 0 alone writes: one log folder, one copy of every file
    assert sorted(p.name for p in dist.iterdir() if p.is_file()) == sorted(
        p.name for p in single.iterdir() if p.is_file())
    assert len([p for p in dist.iterdir() if p.is_dir()]) == 1
    assert len(list(dist.glob('*/*.log'))) == 1
