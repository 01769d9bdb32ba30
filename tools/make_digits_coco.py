"""(Re)generate the digit-canvas detection set (COCO format) of the detection demo.

    python tools/make_digits_coco.py                    # data/digits_coco, if missing or stale
    python tools/make_digits_coco.py --force            # rewrite it anyway
    python tools/make_digits_coco.py --data-root /tmp/dc --num-train 64 --num-test 16

mmbrecq.DigitsCocoDataset generates the same files on first use, so this is only needed
to regenerate explicitly or to write a set with other parameters. A set written with
other parameters is regenerated (with the dataset's parameters) by the next dataset that
uses its data_root with different ones.
"""
import argparse
import json
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmbrecq.datasets.digits_detection import DEFAULT_DATA_ROOT, DEFAULT_PARAMS, SPLITS, make_digits_coco  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-root', default=DEFAULT_DATA_ROOT, help='output directory (replaced)')
    p.add_argument('--force', action='store_true', help='regenerate even if current')
    for name, default in DEFAULT_PARAMS.items():
        p.add_argument('--' + name.replace('_', '-'), type=int, default=default,
                       help=f'generator parameter (default {default})')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    params = {k: getattr(args, k) for k in DEFAULT_PARAMS}
    t0 = time.perf_counter()
    make_digits_coco(args.data_root, force=args.force, **params)
    dt = time.perf_counter() - t0
    for split in SPLITS:
        with open(osp.join(args.data_root, 'annotations', f'{split}.json')) as f:
            coco = json.load(f)
        print(f'[make_digits_coco] {split}: {len(coco["images"])} images, '
              f'{len(coco["annotations"])} boxes')
    print(f'[make_digits_coco] {args.data_root} ready in {dt:.1f}s')


if __name__ == '__main__':
    main()
