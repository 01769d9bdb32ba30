"""End-to-end ``tools/ptq.py`` and ``tools/test.py`` on a tiny ImageNet-format folder.

Each run uses a child config written in ``tmp_path`` (``_base_`` = the model-zoo config
under ``configs/brecq/``) that points mmpretrain's ``ImageNet`` dataset at a folder of
32x32 PNGs with ``meta/{train,val}.txt`` annotation files, shrinks the pipelines,
batch sizes and ``quant_cfg`` (8 calibration images, 2 iterations per unit), and a
float checkpoint saved from the randomly initialised model (no download).

The tools run in-process (``main(argv)`` loaded from the file path). mmengine names
the logger / message hub / visualizer instances of a Runner ``<config name>_<timestamp>``
with a one-second timestamp and ``get_instance`` returns an *existing* instance of that
name, so two runs of the same config starting in the same second would share the first
run's logger (and log file in the first work dir). Every in-process run here therefore
gets its own ``experiment_name`` (``--cfg-options experiment_name=...``). The resume test
needs a process that is killed, so it uses subprocesses; the first one kills itself after
a given number of units, so that no test waits on the clock.

The four family runs stay in the default suite (the rule is to mark them ``slow`` only if
together they take more than about two minutes on the 2-core CI machine).
"""
import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmbrecq  # noqa: F401  (registers the loop/hooks, applies the compat shims)

from _tools import load_tool, unique_name

torch.set_num_threads(1)  # 2-core CI: multithreaded CPU convs are slower here

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs' / 'brecq'
N_TRAIN, N_VAL = 4, 4  # images per class (2 classes)


PTQ = load_tool('ptq')
TEST = load_tool('test')



# ---------------------------------------------------------------------------------------
# fixtures: data, configs, float checkpoints
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """2 classes x 4 PNGs (32x32) in train/ and val/, with meta/train.txt and meta/val.txt."""
    import cv2
    root = tmp_path_factory.mktemp('imagenet_tiny')
    rng = np.random.default_rng(0)
    (root / 'meta').mkdir()
    for split, n in (('train', N_TRAIN), ('val', N_VAL)):
        lines = []
        for label in (0, 1):
            d = root / split / f'class{label}'
            d.mkdir(parents=True)
            for k in range(n):
                base = 70 if label == 0 else 180  # dark vs bright noise
                img = np.clip(base + 60 * rng.standard_normal((32, 32, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(d / f'{k}.png'), img)
                lines.append(f'class{label}/{k}.png {label}')
        (root / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return root


def _write_child_config(directory, base_name, data_root, iters=2, recon_batch=32, name=None):
    """A config in ``directory`` inheriting ``configs/brecq/<base_name>`` sized for the tiny set."""
    path = Path(directory) / (name or f'tiny_{Path(base_name).stem}.py')
    path.write_text(f"""\
_base_ = {str(CONFIGS / base_name)!r}
_data_root = {str(data_root)!r}
_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=32),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=36, edge='short'),
    dict(type='CenterCrop', crop_size=32),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=_data_root, split='train', pipeline=_train_pipeline))
test_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                       dataset=dict(data_root=_data_root, split='val', pipeline=_test_pipeline))
test_evaluator = dict(type='Accuracy', topk=(1, 5))
quant_cfg = dict(calib=dict(num_samples=8, batch_size=4),
                 recon=dict(iters={iters}, batch_size={recon_batch}, progress=False))
""")
    return path


def _float_checkpoint(config_path, out_path, seed=0):
    """The randomly initialised float model (no init_weights) saved as an mmengine checkpoint.

    Classes >= 2 get a large negative bias, so that top-1 is class 0 or 1 and depends on
    the image (the 1000-way random head would otherwise put every image elsewhere and
    every accuracy would be 0, which compares equal whatever the weights).
    """
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(str(config_path))
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    with torch.no_grad():
        fc = model.head.fc
        fc.bias[:2] = 0.
        fc.bias[2:] = -50.
    torch.save({'state_dict': model.state_dict()}, str(out_path))
    return out_path


def _ptq(argv, experiment=None):
    argv = [str(a) for a in argv]
    argv += ['--cfg-options', f'experiment_name={experiment or unique_name("ptq")}']
    return PTQ.main(argv)


def _test_tool(config, checkpoint, work_dir, capsys):
    capsys.readouterr()
    rc = TEST.main([str(config), str(checkpoint), '--work-dir', str(work_dir),
                    '--cfg-options', f'experiment_name={unique_name("test")}'])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith('{') and 'accuracy/top1' in ln]
    assert lines, out[-2000:]
    return ast.literal_eval(lines[-1])


def _unit_names(records):
    return [r['name'] for r in records]


# ---------------------------------------------------------------------------------------
# end-to-end runs, one per family
# ---------------------------------------------------------------------------------------
FAMILIES = [
    pytest.param('resnet18_w4a4.py', 4, 4, 10, id='resnet18-w4a4'),
    pytest.param('resnet50_w2a4.py', 2, 4, 18, id='resnet50-w2a4'),
    pytest.param('mobilenet-v2_w4a4.py', 4, 4, None, id='mobilenet-v2-w4a4'),
    pytest.param('regnetx-400mf_w4a32.py', 4, None, None, id='regnetx-400mf-w4a32'),
    # SE blocks, hard-swish, TF-"same" padding (mmbrecq/blocks/mobile_convnext.py)
    pytest.param('efficientnet-b0_w4a4.py', 4, 4, 19, id='efficientnet-b0-w4a4'),
]
#: unit kinds and counts that summary.json must list
UNIT_KINDS = {'resnet18_w4a4.py': {'Conv2d': 1, 'BasicBlock': 8, 'Linear': 1},
              'efficientnet-b0_w4a4.py': {'Conv2dAdaptivePadding': 2, 'InvertedResidualSE': 16, 'Linear': 1}}


@pytest.mark.parametrize('base_name,w_bits,a_bits,n_units', FAMILIES)
def test_ptq_end_to_end(base_name, w_bits, a_bits, n_units, data_root, tmp_path, capsys):
    config = _write_child_config(tmp_path, base_name, data_root)
    ckpt = _float_checkpoint(config, tmp_path / 'float.pth')
    work_dir = tmp_path / 'work'
    assert _ptq([config, '--checkpoint', ckpt, '--work-dir', work_dir]) == 0

    for name in ('quantized.pth', 'summary.json', 'recon_losses.png', 'recon_state.pth'):
        assert (work_dir / name).is_file(), f'{name} missing from {sorted(os.listdir(work_dir))}'
    assert (work_dir / 'recon_losses.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    summary = json.loads((work_dir / 'summary.json').read_text())
    assert summary['w_bits'] == w_bits and summary['a_bits'] == a_bits
    assert set(summary['metrics']) == {'fp', 'nearest', 'brecq'}
    for stage, metrics in summary['metrics'].items():
        assert 0. <= metrics['accuracy/top1'] <= 100., (stage, metrics)
        assert metrics['accuracy/top5'] == 100.  # classes >= 2 are pushed down by the bias
    assert {'eval_fp', 'eval_nearest', 'calibration', 'reconstruction', 'eval_brecq'} <= set(summary['seconds'])
    assert summary['loaded'] == dict(float_checkpoint=str(ckpt), keys=len(torch.load(ckpt)['state_dict']),
                                     all_keys_matched=True)
    assert all(v >= 0 for v in summary['seconds'].values())

    units = summary['units']
    names = _unit_names(units)
    assert sum(summary['unit_kinds'].values()) == len(names)
    if base_name in UNIT_KINDS:
        assert summary['unit_kinds'] == UNIT_KINDS[base_name]
    assert len(names) == len(set(names)) and names[0].startswith('backbone.'), names
    assert names[-1] == 'head.fc'
    if n_units is not None:
        assert len(names) == n_units, names
    assert all(u['status'] == 'ok' for u in units), units
    assert all(u['loss_start'] is not None and np.isfinite(u['loss_end']) for u in units)

    # every output reads back with weights_only=True (tensors and plain values only)
    state = torch.load(work_dir / 'recon_state.pth', map_location='cpu', weights_only=True)
    assert state['done'] == names

    qckpt = torch.load(work_dir / 'quantized.pth', map_location='cpu', weights_only=True)
    assert qckpt['meta']['format'] == 'mmbrecq.fakequant.v1'
    assert qckpt['meta']['quant_cfg']['w_bits'] == w_bits
    assert qckpt['meta']['quant_cfg']['a_bits'] == a_bits

    # re-evaluation of the saved model gives the same numbers as the PTQ run
    metrics = _test_tool(config, work_dir / 'quantized.pth', tmp_path / 'test_work', capsys)
    assert metrics['accuracy/top1'] == summary['metrics']['brecq']['accuracy/top1']
    assert metrics['accuracy/top5'] == summary['metrics']['brecq']['accuracy/top5']


# ---------------------------------------------------------------------------------------
# resume after a kill
# ---------------------------------------------------------------------------------------
# The first run kills itself (SIGKILL) right after its second unit was saved, through a
# test-only hook loaded by the config: the kill point depends on progress, never on how fast
# the machine is.
RESUME_ITERS, RESUME_BATCH, KILL_AFTER = 5, 8, 2

KILL_HOOK = """
import os
import signal

from mmengine.hooks import Hook

from mmbrecq.registry import HOOKS


@HOOKS.register_module()
class KillAfterUnits(Hook):
    \"\"\"Test only: SIGKILL the run right after its n-th reconstructed unit was saved.\"\"\"

    def __init__(self, n):
        self.n = n

    def after_recon_unit(self, runner, index, unit, record, records):
        if len(records) >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _subprocess_env(*paths):
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [str(p) for p in paths] +
                                        [p for p in [env.get('PYTHONPATH')] if p])
    return env


def test_ptq_resume_after_kill(data_root, tmp_path):
    config = _write_child_config(tmp_path, 'resnet18_w4a4.py', data_root, iters=RESUME_ITERS,
                                 recon_batch=RESUME_BATCH)
    hook_dir = tmp_path / 'hooks'
    hook_dir.mkdir()
    (hook_dir / 'kill_after_units.py').write_text(KILL_HOOK)
    killing = tmp_path / 'killing.py'
    killing.write_text(f"_base_ = {str(config)!r}\n"
                       "custom_imports = dict(imports=['mmbrecq', 'kill_after_units'], allow_failed_imports=False)\n"
                       f"custom_hooks = [dict(type='mmbrecq.KillAfterUnits', n={KILL_AFTER})]\n")
    ckpt = _float_checkpoint(config, tmp_path / 'float.pth')
    work_dir = tmp_path / 'work'
    args = ['--checkpoint', str(ckpt), '--work-dir', str(work_dir)]
    tool = [sys.executable, str(ROOT / 'tools' / 'ptq.py')]

    log1 = tmp_path / 'run1.log'
    with open(log1, 'w') as f:
        rc = subprocess.run(tool + [str(killing)] + args, stdout=f, stderr=subprocess.STDOUT,
                            env=_subprocess_env(hook_dir), cwd=str(ROOT)).returncode
    assert rc == -signal.SIGKILL, f'the first run was not killed (rc {rc}):\n{log1.read_text()[-3000:]}'
    killed_state = torch.load(work_dir / 'recon_state.pth', map_location='cpu', weights_only=True)
    done = list(killed_state['done'])  # the state as the kill left it
    assert len(done) == KILL_AFTER
    assert not (work_dir / 'summary.json').exists()
    assert not (work_dir / 'quantized.pth').exists()

    log2 = tmp_path / 'run2.log'
    with open(log2, 'w') as f:
        rc = subprocess.run(tool + [str(config)] + args + ['--resume'], stdout=f, stderr=subprocess.STDOUT,
                            env=_subprocess_env(), cwd=str(ROOT)).returncode
    text = log2.read_text()
    assert rc == 0, text[-3000:]
    assert f'resume: {len(done)}/10 units already reconstructed' in text
    assert 'fp evaluation already done (resume)' in text
    assert 'nearest evaluation already done (resume)' in text
    for name in done:  # finished units are not reconstructed again
        assert f'] {name} (' not in text, f'{name} was reconstructed again'

    summary = json.loads((work_dir / 'summary.json').read_text())
    names = _unit_names(summary['units'])
    assert len(names) == 10 and len(set(names)) == 10
    assert names[:len(done)] == done
    for name in names[len(done):]:  # ... and the others are, once each
        assert text.count(f'] {name} (') == 1, name
    assert set(summary['metrics']) == {'fp', 'nearest', 'brecq'}
    # the units finished before the kill keep exactly the parameters they had then
    final = torch.load(work_dir / 'quantized.pth', map_location='cpu', weights_only=True)['state_dict']
    kept = [k for k in killed_state['state_dict'] if any(k.startswith(n + '.') for n in done)]
    assert kept
    for k in kept:
        before = killed_state['state_dict'][k]
        if isinstance(before, torch.Tensor):
            torch.testing.assert_close(final[k], before, rtol=0, atol=0, msg=k)
        else:  # extra state (e.g. an AdaRound quantizer's rounding mode)
            assert final[k] == before, k


# ---------------------------------------------------------------------------------------
# bad input: exit code 2, a message naming the problem, nothing written
# ---------------------------------------------------------------------------------------
def _assert_nothing_written(work_dir):
    for name in ('quantized.pth', 'summary.json'):
        assert not (Path(work_dir) / name).exists()


@pytest.fixture
def tiny_config(data_root, tmp_path):
    config = _write_child_config(tmp_path, 'resnet18_w4a4.py', data_root)
    ckpt = tmp_path / 'float.pth'
    torch.save({'state_dict': {}}, str(ckpt))  # never loaded: every bad input fails before
    return config, ckpt


def test_bad_input_missing_checkpoint(tiny_config, tmp_path, capsys):
    config, _ = tiny_config
    missing = tmp_path / 'no_such_dir' / 'float.pth'
    rc = _ptq([config, '--checkpoint', missing, '--work-dir', tmp_path / 'work'])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(missing) in err and 'does not exist' in err
    _assert_nothing_written(tmp_path / 'work')


def test_bad_input_missing_config_checkpoint_key(tmp_path, capsys):
    """No --checkpoint and ``float_checkpoint = None`` (the regnetx-600mf configs)."""
    config = tmp_path / 'no_ckpt.py'
    config.write_text(f"_base_ = {str(CONFIGS / 'resnet18_w4a4.py')!r}\nfloat_checkpoint = None\n")
    rc = _ptq([config, '--work-dir', tmp_path / 'work'])
    err = capsys.readouterr().err
    assert rc == 2 and 'float_checkpoint' in err and '--checkpoint' in err
    _assert_nothing_written(tmp_path / 'work')


def test_bad_input_config_without_quant_cfg(tmp_path, capsys):
    config = tmp_path / 'float_only.py'
    config.write_text("_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'\n")
    ckpt = tmp_path / 'float.pth'
    torch.save({'state_dict': {}}, str(ckpt))
    rc = _ptq([config, '--checkpoint', ckpt, '--work-dir', tmp_path / 'work'])
    err = capsys.readouterr().err
    assert rc == 2 and 'quant_cfg' in err and str(config) in err
    _assert_nothing_written(tmp_path / 'work')


@pytest.mark.parametrize('option,names', [
    ('quant_cfg.wbits=4', ['wbits', 'quant_cfg']),
    ('quant_cfg.recon.iterations=5', ['iterations', 'quant_cfg.recon']),
    ('quant_cfg.calib.samples=5', ['samples', 'quant_cfg.calib']),
    ('quant_cfg.recon.loss=l2', ['quant_cfg.recon.loss', "'l2'"]),
])
def test_bad_input_unknown_or_invalid_key(option, names, tiny_config, tmp_path, capsys):
    config, ckpt = tiny_config
    rc = PTQ.main([str(config), '--checkpoint', str(ckpt), '--work-dir', str(tmp_path / 'work'),
                   '--cfg-options', option, f'experiment_name={unique_name("bad")}'])
    err = capsys.readouterr().err
    assert rc == 2
    for n in names:
        assert n in err, err
    _assert_nothing_written(tmp_path / 'work')


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / 'nope.py'
    assert _ptq([missing, '--work-dir', tmp_path / 'work']) == 2
    assert str(missing) in capsys.readouterr().err


def test_tools_test_missing_quantized_checkpoint(tiny_config, tmp_path, capsys):
    config, _ = tiny_config
    missing = tmp_path / 'quantized.pth'
    assert TEST.main([str(config), str(missing), '--work-dir', str(tmp_path / 'test_work')]) == 2
    assert str(missing) in capsys.readouterr().err
