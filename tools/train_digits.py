"""Train a float model of the demo (slim ResNet-18, MobileNetV3 or a small ViT on scikit-learn's digits).

    python tools/train_digits.py                        # ResNet-18, ~2 min on 2 CPU cores
    python tools/train_digits.py --model mobilenet_v3   # checkpoints/digits_mobilenet_v3_float.pth
    python tools/train_digits.py --model vit            # checkpoints/digits_vit_float.pth
    python tools/train_digits.py --model resnet18_narrow  # checkpoints/digits_resnet18_narrow_float.pth
    python tools/train_digits.py --epochs 5 --out /tmp/quick.pth

Writes a stripped checkpoint (``state_dict`` + ``meta``, no optimizer / message hub) that
``mmengine.runner.load_checkpoint`` reads, and prints its test top-1. The checkpoint only
holds tensors and plain Python values, so even ``torch.load(weights_only=True)`` reads it.
"""
import argparse
import os
import os.path as osp
import sys
import time

# the repository root, so that the script runs without `pip install -e .`
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmbrecq  # noqa: E402,F401  (torch>=2.6 checkpoint-loading fix, registries)

CONFIG_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', '_base_')
#: --model: (config under configs/_base_, default work dir, default checkpoint)
MODELS = dict(
    resnet18=('digits_resnet_float.py', 'work_dirs/digits_resnet_float', 'checkpoints/digits_resnet18_float.pth'),
    mobilenet_v3=('digits_mobilenet_v3_float.py', 'work_dirs/digits_mobilenet_v3_float',
                  'checkpoints/digits_mobilenet_v3_float.pth'),
    vit=('digits_vit_float.py', 'work_dirs/digits_vit_float', 'checkpoints/digits_vit_float.pth'),
    resnet18_narrow=('digits_resnet18_narrow_float.py', 'work_dirs/digits_resnet18_narrow_float',
                     'checkpoints/digits_resnet18_narrow_float.pth'),
)
DEFAULT_CONFIG = osp.join(CONFIG_DIR, MODELS['resnet18'][0])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', choices=sorted(MODELS), default='resnet18',
                   help='which demo model (picks the default --config, --work-dir and --out)')
    p.add_argument('--config', default=None, help='mmpretrain config of the float model (default: the model\'s)')
    p.add_argument('--work-dir', default=None, help='mmengine work dir (logs, full last checkpoint)')
    p.add_argument('--epochs', type=int, default=None, help='override max_epochs of the config')
    p.add_argument('--out', default=None, help='where the stripped checkpoint goes (default: the model\'s)')
    p.add_argument('--seed', type=int, default=None, help='override randomness.seed')
    args = p.parse_args(argv)
    cfg_name, work_dir, out = MODELS[args.model]
    args.config = args.config or osp.join(CONFIG_DIR, cfg_name)
    args.work_dir = args.work_dir or work_dir
    args.out = args.out or out
    return args


def set_epochs(cfg, epochs):
    """Change max_epochs and stretch the epoch-based LR schedule with it."""
    old = cfg.train_cfg.max_epochs
    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_interval = min(cfg.train_cfg.get('val_interval', 1), epochs)
    scheds = []
    for sched in cfg.param_scheduler:
        if sched.get('begin', 0) >= epochs:  # e.g. the cosine phase after a 1-epoch warm-up
            continue
        if sched.get('end') == old or sched.get('end', epochs) > epochs:
            sched['end'] = epochs
        if 'T_max' in sched:
            sched['T_max'] = max(1, sched['end'] - sched.get('begin', 0))
        scheds.append(sched)
    cfg.param_scheduler = scheds


def strip_checkpoint(runner, metrics, train_time):
    """``state_dict`` (CPU tensors) + plain-Python ``meta``: what load_checkpoint needs."""
    import mmengine
    import mmpretrain
    import torch
    from mmengine.model import is_model_wrapper
    from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu

    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    meta = dict(
        dataset_meta=dict(classes=list(runner.test_dataloader.dataset.metainfo['classes'])),
        epoch=int(runner.epoch),
        iter=int(runner.iter),
        seed=int(runner.seed),
        test_metrics={k: float(v) for k, v in metrics.items()},
        train_time_s=round(float(train_time), 1),
        mmengine_version=mmengine.__version__,
        mmpretrain_version=mmpretrain.__version__,
        torch_version=str(torch.__version__),  # a TorchVersion object would need weights_only=False
        cfg=runner.cfg.pretty_text,
    )
    return dict(meta=meta, state_dict=weights_to_cpu(get_state_dict(model)))


def config_from_args(args):
    """The training config with the command line's work dir, ``--epochs`` and ``--seed``."""
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    cfg.work_dir = args.work_dir
    if args.epochs is not None:
        set_epochs(cfg, args.epochs)
    if args.seed is not None:
        cfg.randomness.seed = args.seed
    return cfg


def train_test_save(cfg, out, meta_update=None):
    """Train ``cfg`` with mmengine's Runner, test it, write the stripped checkpoint to ``out``.

    Shared by the classifier and detector trainers; returns ``(metrics, train_time, ckpt,
    size_mib)``. ``meta_update`` edits the checkpoint's ``meta`` before it is written.
    """
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import save_checkpoint

    runner = Runner.from_cfg(cfg)
    t0 = time.perf_counter()
    runner.train()
    train_time = time.perf_counter() - t0
    metrics = runner.test()
    ckpt = strip_checkpoint(runner, metrics, train_time)
    if meta_update is not None:
        meta_update(ckpt['meta'])
    if osp.dirname(out):
        os.makedirs(osp.dirname(out), exist_ok=True)
    save_checkpoint(ckpt, out)
    return metrics, train_time, ckpt, osp.getsize(out) / 2**20


def main(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)
    metrics, train_time, _, size_mb = train_test_save(cfg, args.out)
    top1 = metrics['accuracy/top1']
    print(f'[train_digits] epochs={cfg.train_cfg.max_epochs} train_time={train_time:.1f}s '
          f'test_top1={top1:.2f}% checkpoint={args.out} ({size_mb:.2f} MiB)')
    return top1


if __name__ == '__main__':
    main()
