"""Post-training quantization of an OpenMMLab model with BRECQ.

    python tools/ptq.py CONFIG [--checkpoint CKPT] [--work-dir DIR] [--resume]
                        [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

Several GPUs / nodes: ``tools/dist_ptq.sh CONFIG GPUS [args]`` (torchrun) or
``tools/slurm_ptq.sh PARTITION JOB_NAME CONFIG [args]`` (srun); on a machine without
CUDA the same launchers run CPU processes over gloo.

CONFIG inherits the float model's config (``_base_ = 'mmpretrain::…'``) and adds
``quant_cfg`` and ``float_checkpoint``. Results land in the work dir: ``quantized.pth``,
``summary.json``, ``recon_losses.png``, the resume state and the logs.

Every user error (config, checkpoint, work dir, option) stops with one line naming it and
exit code 2; checkpoints are read with ``weights_only=True`` unless ``--trust-checkpoint``.
"""
import argparse
import contextlib
import copy
import os
import os.path as osp
import sys

from mmengine.runner import Runner

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if sys.path[:1] != [ROOT]:  # this checkout's mmbrecq, whichever one a shared environment installed
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from mmbrecq.utils.cli import CfgOptionsAction, add_trust_argument
    parser = argparse.ArgumentParser(description='BRECQ post-training quantization')
    parser.add_argument('config', help='PTQ config file (inherits the float model config)')
    parser.add_argument('--checkpoint', help='float checkpoint (default: float_checkpoint in the config)')
    parser.add_argument('--work-dir', help='where to save logs, checkpoints and the summary')
    parser.add_argument('--resume', action='store_true',
                        help='continue an interrupted run in the work dir (finished units are kept)')
    parser.add_argument('--no-fp-eval', action='store_true', help='skip the float evaluation')
    parser.add_argument('--no-nearest-eval', action='store_true', help='skip the nearest-rounding evaluation')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of the config, e.g. quant_cfg.w_bits=2')
    add_trust_argument(parser)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _is_url(path):
    return path.startswith(('http://', 'https://', 's3://'))


def build_ptq_config(args):
    """The mmengine config of a PTQ run; every user error in it is raised here, before any work."""
    from mmbrecq.utils.cli import load_config
    cfg = load_config(args.config, args.cfg_options)
    if cfg.get('quant_cfg') is None:
        raise ValueError(f'{args.config} has no quant_cfg section; a PTQ config inherits the float model '
                         "config and adds quant_cfg=dict(w_bits=..., a_bits=...) (see configs/brecq/)")
    from mmbrecq.engine import calib_dataloader_cfg, without_training
    from mmbrecq.modules import QuantConfig
    qcfg = QuantConfig(cfg.quant_cfg)  # validates every key before anything runs
    if qcfg['calib']['dataloader'] is None:  # resolve now: the runner must not see a train dataloader
        cfg.quant_cfg.setdefault('calib', {})
        cfg.quant_cfg.calib.dataloader = copy.deepcopy(calib_dataloader_cfg(cfg, qcfg['calib']))

    ckpt = args.checkpoint or cfg.get('float_checkpoint')
    if not ckpt:
        raise ValueError('no float checkpoint: set float_checkpoint in the config or pass --checkpoint')
    if not _is_url(ckpt) and not osp.isfile(ckpt):
        raise FileNotFoundError(f'float checkpoint {ckpt!r} does not exist (float_checkpoint / --checkpoint)')
    cfg.load_from = None  # the PTQ loop loads it strictly (mmengine's load_from only warns about wrong keys)
    cfg.resume = False

    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.launcher = args.launcher
    cfg.test_cfg = dict(type='mmbrecq.PTQLoop', eval_fp=not args.no_fp_eval,
                        eval_nearest=not args.no_nearest_eval, resume=args.resume, checkpoint=ckpt)
    hooks = list(cfg.get('custom_hooks') or [])
    present = {str(h.get('type', '')).split('.')[-1] for h in hooks}
    for name in ('QuantCheckpointHook', 'ReconLossPlotHook'):
        if name not in present:
            hooks.append(dict(type=f'mmbrecq.{name}'))
    cfg.custom_hooks = hooks
    without_training(cfg)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    import mmbrecq  # noqa: F401  (registers everything, applies the torch-2.9 shims)
    from mmbrecq.reconstruction import NonFiniteLoss
    from mmbrecq.utils import InputError, WorkDirLock, make_work_dir, trusted_checkpoints
    from mmbrecq.utils.cli import launcher_rank
    from mmbrecq.utils.dist import prepare_launcher
    try:
        cfg = build_ptq_config(args)
        make_work_dir(cfg.work_dir)
    except (ValueError, FileNotFoundError) as e:  # InputError is a ValueError
        print(f'error: {e}', file=sys.stderr)
        return 2
    try:
        # one run per work dir: a second one is refused (the lock goes with the process, also on a kill)
        lock = WorkDirLock(cfg.work_dir) if launcher_rank(args.launcher) == 0 else contextlib.nullcontext()
        with lock, trusted_checkpoints(args.trust_checkpoint):
            prepare_launcher(cfg)  # --launcher pytorch|slurm|mpi without CUDA: a gloo group of CPU processes
            runner = Runner.from_cfg(cfg)
            runner.test()
    except (InputError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLoss as e:  # the run failed (quant_cfg.recon.on_nan='fail'); finished units are kept
        print(f"error: {e}; quant_cfg.recon.on_nan='nearest' falls back to nearest rounding for such a unit, "
              '--resume continues after the last finished unit', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
