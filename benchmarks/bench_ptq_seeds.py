"""A PTQ config over seeds and recipe variants, end to end through ``tools/ptq.py``.

For models the API benchmarks do not cover (the detection demo): each run is a real
``tools/ptq.py`` run with ``quant_cfg.calib.seed`` and ``quant_cfg.recon.seed`` set to
the seed (calibration images and reconstruction both change) and the variant's
``--cfg-options``; the metric comes from the run's ``summary.json``. Rows are mean ± half
the min-max range over seeds; a difference within the spread is a tie.

    OMP_NUM_THREADS=1 python benchmarks/bench_ptq_seeds.py configs/brecq/digits_det_faster-rcnn_w4a4.py \
        [--seeds 0 1 2] [--variants default qdrop mse] [--metric coco/bbox_mAP] [--work-dir DIR]
        [--cfg-options quant_cfg.recon.iters=100 ...]
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys

from _seeds import cell, verdict

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: variant -> --cfg-options (the default recipe: none)
VARIANTS = {
    'default': [],
    'qdrop': ['quant_cfg.recon.input_mix=qdrop'],
    'mse': ['quant_cfg.recon.loss=mse'],
}


def run(config, variant, seed, work_dir, metric, extra=()):
    """One ``tools/ptq.py`` run; returns ``{'brecq': value, 'nearest': value or None}``."""
    out = osp.join(work_dir, f'{variant}_seed{seed}')
    opts = [f'quant_cfg.calib.seed={seed}', f'quant_cfg.recon.seed={seed}', 'quant_cfg.recon.progress=False',
            *VARIANTS[variant], *extra]
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'ptq.py'), config, '--work-dir', out, '--no-fp-eval',
           '--cfg-options', *opts]
    if variant != 'default':  # nearest rounding does not depend on the recipe
        cmd.insert(cmd.index('--no-fp-eval'), '--no-nearest-eval')
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(osp.join(out, 'summary.json')) as f:
        metrics = json.load(f)['metrics']
    key = metric or next(iter(metrics['brecq']))
    return key, dict(brecq=metrics['brecq'][key], nearest=metrics.get('nearest', {}).get(key))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--metric', default=None, help="summary.json metric (default: the first, e.g. 'coco/bbox_mAP')")
    p.add_argument('--work-dir', default=None, help='default: work_dirs/seeds/<config name>')
    p.add_argument('--cfg-options', nargs='+', default=[], help='more --cfg-options for every run')
    p.add_argument('--json', help='also write the rows to this file')
    args = p.parse_args()
    name = osp.splitext(osp.basename(args.config))[0]
    work_dir = args.work_dir or osp.join(ROOT, 'work_dirs', 'seeds', name)
    os.makedirs(work_dir, exist_ok=True)
    rows, key = [], None
    for seed in args.seeds:
        for variant in args.variants:
            key, values = run(osp.abspath(args.config), variant, seed, work_dir, args.metric, args.cfg_options)
            rows.append(dict(variant=variant, seed=seed, **values))
            print(f'seed {seed} {variant:10s} {key} {values["brecq"]:.4f}'
                  + (f' (nearest {values["nearest"]:.4f})' if values['nearest'] is not None else ''), flush=True)
            if args.json:
                with open(args.json, 'w') as f:
                    json.dump(rows, f, indent=1)
    ref = [r['brecq'] for r in rows if r['variant'] == 'default']
    print(f'\n{name}, {key}, seeds {args.seeds} (mean ± half range; tie/better/worse vs default)\n')
    print(f'| variant | {key} | vs default |\n|---|---|---|')
    nearest = [r['nearest'] for r in rows if r['nearest'] is not None]
    if nearest:
        print(f'| nearest | {cell(nearest, 4)} | {verdict(nearest, ref, True) if ref else ""} |')
    for variant in args.variants:
        values = [r['brecq'] for r in rows if r['variant'] == variant]
        against = verdict(values, ref, True) if ref and variant != 'default' else ''
        print(f'| {variant} | {cell(values, 4)} | {against} |')


if __name__ == '__main__':
    main()
