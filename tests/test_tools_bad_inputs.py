"""Bad inputs through the real command lines (``tools/ptq.py``, ``tools/test.py``,
``tools/export.py``, loaded in-process): each stops with exit code 2 and one message
naming the file, key or option and the fix, before any work and without a traceback.

The digits demo (``configs/brecq/digits_demo_*.py``, its float checkpoint checked in,
1437 training images) keeps every run small: 8 calibration images, 2 iterations per unit.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import load_checkpoint

import mmbrecq
from mmbrecq.engine import save_quantized
from mmbrecq.utils import WorkDirLock

from _tools import load_tool, unique_name

torch.set_num_threads(1)  # 2-core CI

ROOT = Path(__file__).resolve().parents[1]
W4A4 = ROOT / 'configs' / 'brecq' / 'digits_demo_w4a4.py'
W2A4 = ROOT / 'configs' / 'brecq' / 'digits_demo_w2a4.py'
FLOAT_CKPT = ROOT / 'checkpoints' / 'digits_resnet18_float.pth'
DETECTOR_CKPT = ROOT / 'checkpoints' / 'digits_retinanet_float.pth'
TRAIN_SIZE = 1437
SMALL = ['quant_cfg.calib.num_samples=8', 'quant_cfg.calib.batch_size=8', 'quant_cfg.recon.iters=2',
         'quant_cfg.recon.batch_size=8', 'quant_cfg.recon.progress=False']

PTQ, TEST, EXPORT = load_tool('ptq'), load_tool('test'), load_tool('export')


def _ptq(config, work_dir, *extra, options=(), checkpoint=FLOAT_CKPT):
    argv = [str(config), '--checkpoint', str(checkpoint), '--work-dir', str(work_dir), *map(str, extra),
            '--cfg-options', *SMALL, *options, f'experiment_name={unique_name("bad")}']
    return PTQ.main(argv)


def _test(config, checkpoint, work_dir, *extra):
    return TEST.main([str(config), str(checkpoint), '--work-dir', str(work_dir), *map(str, extra),
                      '--cfg-options', f'experiment_name={unique_name("test")}'])


def _error(capsys):
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return err


def _nothing_written(work_dir):
    for name in ('quantized.pth', 'summary.json'):
        assert not (Path(work_dir) / name).exists(), name


@pytest.fixture(scope='module')
def quantized(tmp_path_factory):
    """A W4A4 quantized.pth of the digits model (calibrated, not reconstructed: loading
    and evaluating it is what these tests need)."""
    cfg = Config.fromfile(str(W4A4))
    model = EXPORT.build_model(cfg)
    load_checkpoint(model, str(FLOAT_CKPT), map_location='cpu', logger='silent')
    qcfg = dict(w_bits=4, a_bits=4, keep_8bit=['first', 'last'])
    model = mmbrecq.quantize_model(model, qcfg)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mmbrecq.calibrate_activations(model, [x], lambda m, b: m(b, mode='tensor'))
    path = tmp_path_factory.mktemp('quantized') / 'quantized.pth'
    save_quantized(model, str(path), qcfg, extra_meta=dict(config=W4A4.name))
    return path


@pytest.fixture(scope='module')
def w4a4_work_dir(tmp_path_factory):
    """The work dir of a finished (small) W4A4 PTQ run."""
    work_dir = tmp_path_factory.mktemp('w4a4') / 'work'
    assert _ptq(W4A4, work_dir, '--no-fp-eval', '--no-nearest-eval') == 0
    return work_dir


def _bad_file(path, kind):
    if kind == 'random':
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == 'empty':
        path.write_bytes(b'')
    else:  # truncated
        path.write_bytes(FLOAT_CKPT.read_bytes()[:100000])
    return path


# ---------------------------------------------------------------------------------------
# float checkpoint
# ---------------------------------------------------------------------------------------
def test_float_checkpoint_of_another_architecture(tmp_path, capsys):
    assert _ptq(W4A4, tmp_path / 'work', checkpoint=DETECTOR_CKPT) == 2
    err = _error(capsys)
    assert f'float checkpoint {DETECTOR_CKPT}' in err and 'does not fit the model' in err
    assert "2 of the model's 122 keys missing (head.fc.weight, head.fc.bias)" in err
    assert '36 unexpected keys (neck.' in err and 'and 31 more' in err  # a few named, and the counts
    assert 'backbone.conv1.weight (16, 3, 7, 7) vs (16, 3, 3, 3)' in err
    _nothing_written(tmp_path / 'work')


def test_float_checkpoint_with_one_key_missing(tmp_path, capsys):
    state = torch.load(str(FLOAT_CKPT), weights_only=True)['state_dict']
    state.pop('head.fc.bias')
    ckpt = tmp_path / 'partial.pth'
    torch.save({'state_dict': state}, str(ckpt))
    assert _ptq(W4A4, tmp_path / 'work', checkpoint=ckpt) == 2
    err = _error(capsys)
    assert '1 of the model' in err and 'head.fc.bias' in err and 'unexpected' not in err


@pytest.mark.parametrize('on_nan', ['fail', 'nearest'])
def test_nan_in_float_weights_names_the_parameter(on_nan, tmp_path, capsys):
    state = torch.load(str(FLOAT_CKPT), weights_only=True)['state_dict']
    state['backbone.layer2.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    ckpt = tmp_path / 'nan.pth'
    torch.save({'state_dict': state}, str(ckpt))
    assert _ptq(W4A4, tmp_path / 'work', checkpoint=ckpt, options=[f'quant_cfg.recon.on_nan={on_nan}']) == 2
    err = _error(capsys)
    assert 'backbone.layer2.0.conv1.weight' in err and 'non-finite' in err
    assert 'backbone.conv1' not in err.replace('layer2.0.conv1', '')
    _nothing_written(tmp_path / 'work')


@pytest.mark.parametrize('kind', ['random', 'empty', 'truncated'])
def test_float_checkpoint_that_is_no_checkpoint(kind, tmp_path, capsys):
    ckpt = _bad_file(tmp_path / 'float.pth', kind)
    assert _ptq(W4A4, tmp_path / 'work', checkpoint=ckpt) == 2
    err = _error(capsys)
    assert f"float checkpoint '{ckpt}' is not a readable checkpoint" in err


# ---------------------------------------------------------------------------------------
# calibration set size
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('num_samples', [TRAIN_SIZE + 1, 5000])
def test_more_calibration_samples_than_the_train_set(num_samples, tmp_path, capsys):
    rc = _ptq(W4A4, tmp_path / 'work', '--no-fp-eval', options=[f'quant_cfg.calib.num_samples={num_samples}'])
    assert rc == 2
    err = _error(capsys)
    assert f'quant_cfg.calib.num_samples={num_samples}' in err
    assert f'has only {TRAIN_SIZE} samples' in err  # the real count, not a multiple of the batch size
    _nothing_written(tmp_path / 'work')


def test_calibration_with_exactly_the_train_set(tmp_path):
    """The boundary: every training image, the last batch short (1437 = 179 * 8 + 5)."""
    from mmengine.runner import Runner

    from mmbrecq.engine import build_calibration_set
    cfg = PTQ.build_ptq_config(PTQ.parse_args([str(W4A4), '--checkpoint', str(FLOAT_CKPT), '--work-dir',
                                               str(tmp_path), '--cfg-options', *SMALL,
                                               f'experiment_name={unique_name("calib")}']))
    runner = Runner.from_cfg(cfg)
    calib = build_calibration_set(runner, runner.model, dict(cfg.quant_cfg.calib, num_samples=TRAIN_SIZE))
    assert calib.num_samples == TRAIN_SIZE


# ---------------------------------------------------------------------------------------
# command line and config
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('tool', ['ptq', 'test', 'export'])
def test_cfg_options_item_without_equals(tool, quantized, tmp_path, capsys):
    argv = {'ptq': [str(W4A4), '--work-dir', str(tmp_path / 'w')],
            'test': [str(W4A4), str(quantized)],
            'export': [str(W4A4), str(quantized), '--format', 'int']}[tool]
    with pytest.raises(SystemExit) as e:
        load_tool(tool).main(argv + ['--cfg-options', 'quant_cfg.w_bits'])
    assert e.value.code == 2
    err = _error(capsys)
    assert "'quant_cfg.w_bits'" in err and 'KEY=VALUE' in err


@pytest.mark.parametrize('tool', ['ptq', 'test', 'export'])
def test_config_with_a_syntax_error(tool, quantized, tmp_path, capsys):
    config = tmp_path / 'broken.py'
    config.write_text(f"_base_ = [{str(W4A4)!r}]\nquant_cfg = dict(w_bits=4,\n    a_bits=4 recon=None)\n")
    argv = {'ptq': [str(config), '--work-dir', str(tmp_path / 'w')],
            'test': [str(config), str(quantized)],
            'export': [str(config), str(quantized), '--format', 'int']}[tool]
    assert load_tool(tool).main(argv) == 2
    err = _error(capsys)
    assert f'config file {config}, line 3' in err and 'a_bits=4 recon=None' in err


def test_work_dir_under_a_regular_file(tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    assert _ptq(W4A4, tmp_path / 'file' / 'work') == 2
    err = _error(capsys)
    assert str(tmp_path / 'file' / 'work') in err and '--work-dir' in err


def test_second_run_in_the_same_work_dir_is_refused(tmp_path, capsys):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    with WorkDirLock(work_dir):  # a first run holds the work dir
        assert _ptq(W4A4, work_dir) == 2
    err = _error(capsys)
    assert 'in use by another run' in err and str(os.getpid()) in err
    _nothing_written(work_dir)


# ---------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------
def test_outputs_of_a_run_load_weights_only_and_summary_states_what_was_loaded(w4a4_work_dir):
    for name in ('quantized.pth', 'recon_state.pth'):
        torch.load(str(w4a4_work_dir / name), map_location='cpu', weights_only=True)
    summary = json.loads((w4a4_work_dir / 'summary.json').read_text())
    n_keys = len(torch.load(str(FLOAT_CKPT), weights_only=True)['state_dict'])
    assert summary['loaded'] == dict(float_checkpoint=str(FLOAT_CKPT), keys=n_keys, all_keys_matched=True)
    assert not [f for f in os.listdir(w4a4_work_dir) if f.endswith('.tmp')]


def test_resume_with_another_config_names_the_file_and_the_fix(w4a4_work_dir, capsys):
    assert _ptq(W2A4, w4a4_work_dir, '--resume') == 2
    err = _error(capsys)
    assert 'quant_cfg.w_bits: 4 then, 2 now' in err and str(w4a4_work_dir / 'ptq_progress.json') in err
    assert 'resume with the config it was started with' in err


def test_resume_state_of_another_config_without_progress_file(w4a4_work_dir, tmp_path, capsys):
    """Without ptq_progress.json the resume state itself is checked against the model."""
    import shutil
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    shutil.copy(w4a4_work_dir / 'recon_state.pth', work_dir / 'recon_state.pth')
    assert _ptq(W2A4, work_dir, '--resume', '--no-fp-eval', '--no-nearest-eval') == 2
    err = _error(capsys)
    assert str(work_dir / 'recon_state.pth') in err and 'without --resume' in err


@pytest.mark.parametrize('kind', ['random', 'empty', 'truncated'])
def test_resume_state_that_is_no_checkpoint(kind, tmp_path, capsys):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    state = _bad_file(work_dir / 'recon_state.pth', kind)
    assert _ptq(W4A4, work_dir, '--resume') == 2
    err = _error(capsys)
    assert f"resume state '{state}' is not a readable checkpoint" in err


def test_resume_with_an_empty_progress_file(w4a4_work_dir, tmp_path, capsys):
    """An empty ptq_progress.json (left by a kill before writes were atomic) means: no
    progress; the evaluations are redone, the reconstructed units are kept."""
    import shutil
    work_dir = tmp_path / 'work'
    shutil.copytree(w4a4_work_dir, work_dir)
    (work_dir / 'ptq_progress.json').write_text('')
    os.remove(work_dir / 'summary.json')
    assert _ptq(W4A4, work_dir, '--resume', '--no-fp-eval', '--no-nearest-eval') == 0
    summary = json.loads((work_dir / 'summary.json').read_text())
    assert 'brecq' in summary['metrics']
    log = ''.join(p.read_text() for p in work_dir.rglob('*.log'))
    assert 'ptq_progress.json is not readable' in log and 'units already reconstructed' in log


# ---------------------------------------------------------------------------------------
# quantized checkpoints: tools/test.py and tools/export.py
# ---------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('tool', ['test', 'export'])
def test_pickle_payload_is_refused_without_running(tool, quantized, tmp_path, capsys):
    ckpt = torch.load(str(quantized), weights_only=True)
    marker = tmp_path / 'payload_ran'
    ckpt['meta']['extra'] = _Payload(marker)
    evil = tmp_path / 'quantized.pth'
    torch.save(ckpt, str(evil))
    if tool == 'test':
        rc = _test(W4A4, evil, tmp_path / 'w')
    else:
        rc = EXPORT.main([str(W4A4), str(evil), '--format', 'int', '--out', str(tmp_path / 'x.pth')])
    assert rc == 2
    err = _error(capsys)
    assert str(evil) in err and 'open' in err and '--trust-checkpoint' in err
    assert not marker.exists()
    assert not (tmp_path / 'x.pth').exists()


@pytest.mark.parametrize('kind', ['random', 'empty', 'truncated'])
@pytest.mark.parametrize('tool', ['test', 'export'])
def test_quantized_checkpoint_that_is_no_checkpoint(tool, kind, tmp_path, capsys):
    ckpt = _bad_file(tmp_path / 'quantized.pth', kind)
    if tool == 'test':
        rc = _test(W4A4, ckpt, tmp_path / 'w')
    else:
        rc = EXPORT.main([str(W4A4), str(ckpt), '--format', 'int'])
    assert rc == 2
    assert f"quantized checkpoint '{ckpt}' is not a readable checkpoint" in _error(capsys)


def test_test_tool_refuses_other_bits_and_says_which_were_loaded(quantized, tmp_path, capsys):
    assert _test(W2A4, quantized, tmp_path / 'w') == 2
    err = _error(capsys)
    assert 'w_bits=4, a_bits=4' in err and 'w_bits=2, a_bits=4' in err and 'quant_cfg.w_bits=4' in err
    assert _test(W4A4, quantized, tmp_path / 'w') == 0
    assert f'loaded {quantized}: W4A4' in capsys.readouterr().err


@pytest.mark.parametrize('shape', [['1', '3', '32'], ['1', '3', '0', '32']])
def test_export_shape_of_the_wrong_length(shape, quantized, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        EXPORT.main([str(W4A4), str(quantized), '--format', 'onnx', '--shape', *shape])
    assert e.value.code == 2
    err = _error(capsys)
    assert f'--shape {" ".join(shape)}' in err and 'N C H W' in err


def test_export_shape_the_model_cannot_run(quantized, tmp_path, capsys):
    out = tmp_path / 'm.onnx'
    rc = EXPORT.main([str(W4A4), str(quantized), '--format', 'onnx', '--shape', '1', '1', '32', '32',
                      '--out', str(out)])
    assert rc == 2
    err = _error(capsys)
    assert '--shape 1 1 32 32' in err and 'does not run on a batch of this shape' in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# quant_cfg values (one schema: mmbrecq/config/quant_cfg.py)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('option, message', [
    ('quant_cfg.recon.iters=True', 'quant_cfg.recon.iters must be a positive integer, got True'),
    ('quant_cfg.recon.warmup=abc', "quant_cfg.recon.warmup must be a number in [0, 1), got 'abc'"),
    ('quant_cfg.recon=5', 'quant_cfg.recon must be a dict, got 5'),
    ('quant_cfg=abc', "quant_cfg must be a dict, got 'abc'"),
    ('quant_cfg.calib.split=valid', "quant_cfg.calib.split='valid': expected one of ('train', 'val', 'test')"),
    ('quant_cfg.keep_8bit=[first,backbone.nosuchlayer*]',
     "quant_cfg.keep_8bit: pattern 'backbone.nosuchlayer*' matches no quantizable layer"),
    ('quant_cfg.w_bits=9', 'quant_cfg.w_bits=9 is not a supported bit width'),
    ('quant_cfg.recon.typo=1', "unknown key(s) in quant_cfg.recon: ['typo']"),
])
def test_bad_quant_cfg_value_names_its_key_path(option, message, tmp_path, capsys):
    assert _ptq(W4A4, tmp_path / 'work', options=[option]) == 2
    err = _error(capsys)
    assert message in err, err
    _nothing_written(tmp_path / 'work')


def test_non_finite_loss_ends_the_run_with_a_message(tmp_path, capsys, monkeypatch):
    """A NaN during reconstruction (``on_nan='fail'``): one message naming the unit and the
    options, exit 1, no traceback."""
    from mmbrecq.reconstruction import optimize
    real = optimize.quantized_reconstruction_loss
    monkeypatch.setattr(optimize, 'quantized_reconstruction_loss', lambda *a: real(*a) * float('nan'))
    monkeypatch.setattr(optimize, 'reconstruction_loss', lambda *a: torch.tensor(float('nan')))
    assert _ptq(W4A4, tmp_path / 'work', '--no-fp-eval', '--no-nearest-eval') == 1
    err = _error(capsys)
    assert "unit 'backbone.conv1'" in err and 'non-finite loss' in err and "on_nan='nearest'" in err
