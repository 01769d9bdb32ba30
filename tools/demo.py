"""The embedded demo: BRECQ on the digits classifier at W4A4 and W2A4, then a table.

    python tools/demo.py [--work-dir work_dirs/digits_demo] [--cfg-options k=v ...]

Runs ``tools/ptq.py`` on configs/brecq/digits_demo_w4a4.py and digits_demo_w2a4.py (real
handwritten digits from scikit-learn, a slim ResNet-18, everything on CPU) and prints
float / nearest-rounding / BRECQ top-1 from their ``summary.json``.
"""
import argparse
import importlib.util
import json
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = ('configs/brecq/digits_demo_w4a4.py', 'configs/brecq/digits_demo_w2a4.py')


def _ptq_main():
    spec = importlib.util.spec_from_file_location('mmbrecq_tools_ptq', osp.join(ROOT, 'tools', 'ptq.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default='work_dirs/digits_demo')
    parser.add_argument('--cfg-options', nargs='+', default=[], help='passed on to tools/ptq.py')
    args = parser.parse_args(argv)
    ptq = _ptq_main()
    rows = []
    for config in CONFIGS:
        name = osp.splitext(osp.basename(config))[0]
        work_dir = osp.join(args.work_dir, name)
        t0 = time.perf_counter()
        # a distinct experiment name per run: mmengine keys its logger instances by it
        rc = ptq([osp.join(ROOT, config), '--work-dir', work_dir, '--cfg-options',
                  f'experiment_name={name}_{int(time.time())}', *args.cfg_options])
        if rc:
            return rc
        with open(osp.join(work_dir, 'summary.json')) as f:
            summary = json.load(f)
        rows.append((summary, time.perf_counter() - t0))
    print('\nBRECQ on the digits demo (scikit-learn digits, 360 test images), top-1 %')
    print(f'| {"setting":7s} | {"float":>6s} | {"nearest":>7s} | {"BRECQ":>6s} | {"time (s)":>8s} |')
    print(f'|{"-" * 9}|{"-" * 8}|{"-" * 9}|{"-" * 8}|{"-" * 10}|')
    for summary, seconds in rows:
        m = summary['metrics']
        top1 = {k: m[k]['accuracy/top1'] for k in ('fp', 'nearest', 'brecq')}
        setting = f'W{summary["w_bits"]}A{summary["a_bits"]}'
        print(f'| {setting:7s} | {top1["fp"]:6.2f} | {top1["nearest"]:7.2f} | {top1["brecq"]:6.2f} | {seconds:8.0f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
