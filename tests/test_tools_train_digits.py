"""The demo trainers' command line: work dir, --epochs (with the LR schedule stretched) and
--seed reach the config, for the classifier and the detectors alike (no training here)."""
import pytest
from mmengine.config import Config

from _tools import load_tool


@pytest.mark.parametrize('tool,argv', [('train_digits', []), ('train_digits', ['--model', 'mobilenet_v3']),
                                       ('train_digits', ['--model', 'vit']),
                                       ('train_digits_det', ['--model', 'retinanet']),
                                       ('train_digits_det', ['--model', 'faster_rcnn'])])
def test_command_line_reaches_the_config(tool, argv, tmp_path):
    mod = load_tool(tool)
    plain = mod.config_from_args(mod.parse_args(argv + ['--work-dir', str(tmp_path)]))
    assert plain.train_cfg.max_epochs == Config.fromfile(mod.parse_args(argv).config).train_cfg.max_epochs > 3
    cfg = mod.config_from_args(mod.parse_args(argv + ['--epochs', '3', '--seed', '7', '--work-dir', str(tmp_path)]))
    assert cfg.work_dir == str(tmp_path)
    assert cfg.train_cfg.max_epochs == 3 and cfg.randomness.seed == 7
    assert all(s.get('end', 3) <= 3 and s.get('begin', 0) < 3 for s in cfg.param_scheduler)
