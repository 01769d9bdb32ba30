"""Evaluate a saved quantized model without reconstructing it.

    python tools/test.py CONFIG QUANT_CKPT [--work-dir DIR] [--cfg-options k=v ...] [--launcher ...]
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.runner import Runner


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='evaluate an mmbrecq quantized checkpoint')
    parser.add_argument('config', help='the PTQ config the checkpoint was made with')
    parser.add_argument('checkpoint', help='quantized checkpoint (quantized.pth)')
    parser.add_argument('--work-dir', help='where to save the logs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    import mmbrecq  # noqa: F401
    from mmbrecq.engine import load_quantized, without_training
    for path, what in ((args.config, 'config file'), (args.checkpoint, 'quantized checkpoint')):
        if not osp.isfile(path):
            print(f'error: {what} {path!r} does not exist', file=sys.stderr)
            return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0], 'test')
    cfg.launcher = args.launcher
    cfg.load_from, cfg.resume = None, False
    without_training(cfg)
    cfg.test_cfg = dict()
    from mmbrecq.utils.dist import prepare_launcher
    prepare_launcher(cfg)  # --launcher pytorch|slurm|mpi without CUDA: a gloo group of CPU processes
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    load_quantized(model, args.checkpoint)
    metrics = runner.test()
    print(metrics)
    return 0


if __name__ == '__main__':
    sys.exit(main())
