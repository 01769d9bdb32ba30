"""End-to-end ``tools/ptq.py`` with ``quant_cfg.mixed_precision`` on the digits demo model
(configs/brecq/digits_demo_mp_w3size_a4.py, 64 calibration images, 2 iterations per unit,
min-max ranges), then ``--resume`` (the saved bit map is reused, nothing searched) and
``tools/test.py`` on the mixed-bit checkpoint. Bad mixed-precision configs stop
``tools/ptq.py`` before any work (exit code 2)."""
import json
import os
from pathlib import Path

import pytest
import torch

import mmbrecq  # noqa: F401
import mmbrecq.mixed_precision.pipeline as pipeline

from _tools import load_tool, unique_name

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'brecq' / 'digits_demo_mp_w3size_a4.py'


def _argv(work, *extra, options=()):
    return [str(CONFIG), '--work-dir', str(work), '--no-fp-eval', '--checkpoint',
            str(ROOT / 'checkpoints' / 'digits_resnet18_float.pth'), *extra, '--cfg-options',
            f'experiment_name={unique_name("mp")}',
            'quant_cfg.calib.num_samples=64', 'quant_cfg.calib.batch_size=32',
            'quant_cfg.recon.iters=2', 'quant_cfg.recon.progress=False',
            'quant_cfg.weight_quantizer.type=AdaRoundQuantizer', 'quant_cfg.weight_quantizer.init=minmax',
            'quant_cfg.act_quantizer.type=LSQQuantizer', 'quant_cfg.act_quantizer.init=minmax', *options]


def test_ptq_tool_with_mixed_precision(tmp_path, monkeypatch):
    ptq, test = load_tool('ptq'), load_tool('test')
    work = tmp_path / 'work'
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's relative paths
    try:
        assert ptq.main(_argv(work)) == 0
        summary = json.loads((work / 'summary.json').read_text())
        report = json.loads((work / 'mixed_precision.json').read_text())
        mp = summary['mixed_precision']
        assert summary['w_bits'] == 'mixed' and mp['bit_map'] == str(work / 'mixed_precision.json')
        assert mp['budget_met'] and mp['size_mb'] <= mp['budget']['size_mb'] == pytest.approx(
            report['uniform']['3']['size_mb'])
        assert mp['bops'] > 0 and mp['budget_spec'] == 'uniform_w3' and not mp['reused']
        assert set(report['bit_map'].values()) <= {2, 4, 8} and len(set(report['bit_map'].values())) > 1
        assert (work / 'mp_sensitivity.png').is_file() and (work / 'mp_sensitivity_cache.json').is_file()
        assert 'mixed_precision' in summary['seconds'] and summary['metrics']['brecq']['accuracy/top1'] > 50

        # the saved model holds the searched bits and tools/test.py rebuilds it
        from mmbrecq.utils import load_checkpoint_file
        state = load_checkpoint_file(str(work / 'quantized.pth'))['state_dict']
        saved = {k[:-len('.weight_quantizer._extra_state')]: v['bits'] for k, v in state.items()
                 if k.endswith('.weight_quantizer._extra_state')}
        assert saved == report['bit_map']
        metrics = test.main([str(CONFIG), str(work / 'quantized.pth'), '--work-dir', str(tmp_path / 'test'),
                             '--cfg-options', f'experiment_name={unique_name("mpt")}'])
        assert metrics == 0

        # --resume: the bit map is read back, never searched again
        monkeypatch.setattr(pipeline, '_search', lambda *a, **k: pytest.fail('resumed run searched again'))
        assert ptq.main(_argv(work, '--resume', '--no-nearest-eval')) == 0
        again = json.loads((work / 'summary.json').read_text())
        assert again['mixed_precision']['reused'] and again['mixed_precision']['size_mb'] == mp['size_mb']
        assert json.loads((work / 'mixed_precision.json').read_text())['bit_map'] == report['bit_map']
        assert again['metrics']['brecq'] == summary['metrics']['brecq']
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize('option, match', [
    ('quant_cfg.mixed_precision.budget.bops=2', 'quant_cfg.mixed_precision.budget must be a dict with exactly one'),
    ('quant_cfg.mixed_precision.populaton_size=3', r"unknown key\(s\) in quant_cfg.mixed_precision"),
    ('quant_cfg.mixed_precision.candidates=[2,4,9]', r'quant_cfg.mixed_precision.candidates\[2\]=9'),
])
def test_bad_mixed_precision_config_exit_2(tmp_path, capsys, option, match):
    ptq = load_tool('ptq')
    assert ptq.main(_argv(tmp_path / 'work', options=[option])) == 2
    import re
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / 'work').exists()
