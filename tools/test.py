"""Evaluate a saved quantized model without reconstructing it.

    python tools/test.py CONFIG QUANT_CKPT [--work-dir DIR] [--cfg-options k=v ...] [--launcher ...]
                         [--trust-checkpoint]

The model is rebuilt with the quant_cfg stored in QUANT_CKPT (the bits it was quantized
with, printed before the evaluation). A config whose ``quant_cfg`` asks for other bits
(``w_bits`` / ``a_bits``) is refused (exit 2): the numbers would not be those of the
config. Every user error stops with one line naming it and exit code 2.
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.runner import Runner

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if sys.path[:1] != [ROOT]:  # this checkout's mmbrecq, whichever one a shared environment installed
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from mmbrecq.utils.cli import CfgOptionsAction, add_trust_argument
    parser = argparse.ArgumentParser(description='evaluate an mmbrecq quantized checkpoint')
    parser.add_argument('config', help='the PTQ config the checkpoint was made with')
    parser.add_argument('checkpoint', help='quantized checkpoint (quantized.pth)')
    parser.add_argument('--work-dir', help='where to save the logs')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def check_bits(cfg, meta, config_path, ckpt_path):
    """``'W4A4'``-style bits of the checkpoint; an InputError when the config asks for others."""
    from mmbrecq.modules import QuantConfig
    from mmbrecq.utils import InputError
    try:
        saved = QuantConfig(meta['quant_cfg'])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f'{ckpt_path}: the quant_cfg stored in it is not valid here ({e})') from e
    bits = f'W{saved.w_bits}A{saved.a_bits if saved.a_bits is not None else 32}'
    if cfg.get('quant_cfg') is not None:
        try:
            asked = QuantConfig(cfg.quant_cfg)
        except ValueError as e:
            raise InputError(f'{config_path}: {e}') from e
        if (asked.w_bits, asked.a_bits) != (saved.w_bits, saved.a_bits):
            raise InputError(f'{ckpt_path} was quantized with w_bits={saved.w_bits}, a_bits={saved.a_bits}, but '
                             f'{config_path} asks for w_bits={asked.w_bits}, a_bits={asked.a_bits}; evaluate it '
                             f'with the config it was made with (meta.config={meta.get("config")!r}), or pass '
                             f'--cfg-options quant_cfg.w_bits={saved.w_bits} quant_cfg.a_bits={saved.a_bits}')
    return bits


def main(argv=None):
    args = parse_args(argv)
    import mmbrecq  # noqa: F401
    from mmbrecq.engine import load_quantized, without_training
    from mmbrecq.engine.quant_checkpoint import read_quantized
    from mmbrecq.utils import InputError, make_work_dir, trusted_checkpoints
    from mmbrecq.utils.cli import load_config
    from mmbrecq.utils.dist import prepare_launcher
    try:
        with trusted_checkpoints(args.trust_checkpoint):
            cfg = load_config(args.config, args.cfg_options)
            if not osp.isfile(args.checkpoint):
                raise InputError(f'quantized checkpoint {args.checkpoint!r} does not exist')
            meta = read_quantized(args.checkpoint)['meta']  # refused before the runner is built
            bits = check_bits(cfg, meta, args.config, args.checkpoint)
            cfg.work_dir = args.work_dir or osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0],
                                                     'test')
            make_work_dir(cfg.work_dir)
            cfg.launcher = args.launcher
            cfg.load_from, cfg.resume = None, False
            without_training(cfg)
            cfg.test_cfg = dict()
            prepare_launcher(cfg)  # --launcher pytorch|slurm|mpi without CUDA: a gloo group of CPU processes
            runner = Runner.from_cfg(cfg)
            model = runner.model.module if hasattr(runner.model, 'module') else runner.model
            load_quantized(model, args.checkpoint)
            runner.logger.info(f'loaded {args.checkpoint}: {bits} (the quant_cfg stored in the checkpoint)')
            print(f'loaded {args.checkpoint}: {bits}', file=sys.stderr)
            metrics = runner.test()
    except (InputError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(metrics)
    return 0


if __name__ == '__main__':
    sys.exit(main())
