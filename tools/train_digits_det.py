"""Train a float detector of the detection demo (RetinaNet / Faster R-CNN on digit canvases).

    python tools/train_digits_det.py --model retinanet      # checkpoints/digits_retinanet_float.pth
    python tools/train_digits_det.py --model faster_rcnn  # checkpoints/digits_faster_rcnn_float.pth
    python tools/train_digits_det.py --model retinanet --epochs 2 --out /tmp/quick.pth

mmdet's own training through mmengine's Runner, on mmbrecq.DigitsCocoDataset (generated
under data/digits_coco on first use). Writes a stripped checkpoint (``state_dict`` +
``meta``, no optimizer / message hub; ``torch.load(weights_only=True)`` reads it) and
prints the test bbox mAP of CocoMetric.

On a machine shared with other jobs, run it with ``OMP_NUM_THREADS=1``: with two OpenMP
threads on two cores and one other busy process, an iteration took 9 s instead of 0.25 s.
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# the repository root, so that the script runs without `pip install -e .`, and tools/
sys.path.insert(0, ROOT)
sys.path.insert(1, osp.join(ROOT, 'tools'))

from train_digits import config_from_args, train_test_save  # noqa: E402

import mmbrecq  # noqa: E402,F401  (torch>=2.6 checkpoint-loading fix, registries)

MODELS = dict(
    retinanet=('digits_retinanet_float.py', 'checkpoints/digits_retinanet_float.pth'),
    faster_rcnn=('digits_faster_rcnn_float.py', 'checkpoints/digits_faster_rcnn_float.pth'),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', choices=sorted(MODELS), default='retinanet',
                   help='which demo detector (picks the default --config and --out)')
    p.add_argument('--config', default=None,
                   help='mmdet config (default: configs/_base_/digits_<model>_float.py)')
    p.add_argument('--work-dir', default=None,
                   help='mmengine work dir (default: work_dirs/digits_<model>_float)')
    p.add_argument('--epochs', type=int, default=None, help='override max_epochs of the config')
    p.add_argument('--out', default=None,
                   help='where the stripped checkpoint goes '
                        '(default: checkpoints/digits_<model>_float.pth)')
    p.add_argument('--seed', type=int, default=None, help='override randomness.seed')
    args = p.parse_args(argv)
    cfg_name, out = MODELS[args.model]
    args.config = args.config or osp.join(ROOT, 'configs', '_base_', cfg_name)
    args.out = args.out or out
    args.work_dir = args.work_dir or osp.join('work_dirs', f'digits_{args.model}_float')
    return args


def main(argv=None):
    args = parse_args(argv)
    import mmdet

    cfg = config_from_args(args)
    # evaluate once, by runner.test(), not also by a validation at the last epoch
    cfg.train_cfg.val_interval = cfg.train_cfg.max_epochs + 1

    def detector_meta(meta):
        meta.pop('mmpretrain_version', None)
        meta['mmdet_version'] = mmdet.__version__

    metrics, train_time, ckpt, size_mb = train_test_save(cfg, args.out, detector_meta)
    mAP, mAP50 = metrics['coco/bbox_mAP'], metrics['coco/bbox_mAP_50']
    n_params = sum(v.numel() for k, v in ckpt['state_dict'].items()
                   if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
    print(f'[train_digits_det] model={args.model} epochs={cfg.train_cfg.max_epochs} '
          f'train_time={train_time:.1f}s bbox_mAP={mAP:.3f} bbox_mAP_50={mAP50:.3f} '
          f'params={n_params / 1e6:.3f}M checkpoint={args.out} ({size_mb:.2f} MiB)')
    return metrics


if __name__ == '__main__':
    main()
