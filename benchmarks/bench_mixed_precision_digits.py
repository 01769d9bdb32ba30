"""Mixed-precision BRECQ vs uniform BRECQ at the same model size, on the digits demo model.

The budget is the weight size of uniform W3 (first and last layer 8-bit in both, as
``keep_8bit``); the search picks 2 / 4 / 8 bits per layer (per-layer combinations inside
each block) under it. Activations are 4-bit everywhere (8-bit around the first and last
layer). Both rows share one calibration set, one seed and the same reconstruction
settings; each row is measured in this run. Top-1 saturates on this easy set, so the mean
KL(float || quantized) on the test split is printed too.

    python benchmarks/bench_mixed_precision_digits.py [--iters 1000] [--num-samples 512]
        [--tradeoff 2.5 3.5 --uniform 2 4]   # more budgets (equivalent bits) -> trade-off PNG
        [--variants raw:full:0 raw:prefix:0 abs_plus_one:full:0 raw:full:50]   # sensitivity variants
"""
import argparse
import copy
import json
import os
import os.path as osp
import tempfile
import time

import torch

from mmbrecq.engine.demo import digits_benchmark_setup, top1_and_kl


def quantized(float_model, calib, w_bits, a_bits=4, mp=None):
    import mmbrecq
    qcfg = dict(w_bits=w_bits, a_bits=a_bits)
    if mp is not None:
        qcfg['mixed_precision'] = mp
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), qcfg)
    mmbrecq.set_quant_state(model, True, True)
    mmbrecq.calibrate_activations(model, calib.batches[:1], calib.forward)
    return model, qcfg


def run(label, float_model, calib, test_batches, fp_logits, args, w_bits, mp=None, work_dir=None):
    import mmbrecq
    from mmbrecq.mixed_precision import ModelSize, search_mixed_precision, trace_layer_stats, weight_bits_of
    model, qcfg = quantized(float_model, calib, w_bits, mp=mp)
    t0 = time.perf_counter()
    summary = None
    if mp is not None:
        summary = search_mixed_precision(model, calib, qcfg, work_dir=work_dir, logger='silent')
    t_search = time.perf_counter() - t0
    nearest_top1, nearest_kl = top1_and_kl(model, test_batches, fp_logits)
    t0 = time.perf_counter()
    mmbrecq.reconstruct(model, calib, dict(iters=args.iters, progress=False, seed=args.seed), logger='silent')
    t_recon = time.perf_counter() - t0
    top1, kl = top1_and_kl(model, test_batches, fp_logits)
    stats = trace_layer_stats(model, calib.forward, calib.batches[0])
    bits = weight_bits_of(model)
    size = ModelSize(stats)({n: (b, None) for n, b in bits.items()})
    return dict(label=label, kind='uniform' if mp is None else 'mixed', size_mb=size, nearest_top1=nearest_top1,
                nearest_kl=nearest_kl, top1=top1, kl=kl, search_s=t_search, recon_s=t_recon,
                bits=sorted(set(bits.values())), budget_met=None if summary is None else summary['budget_met'],
                sensitivity_total=None if summary is None else summary['sensitivity_total'])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--iters', type=int, default=1000)
    p.add_argument('--num-samples', type=int, default=512)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--budget-bits', type=float, default=3, help='budget: size of uniform W<b> weights')
    p.add_argument('--tradeoff', type=float, nargs='*', default=[],
                   help='more mixed-precision budgets, in equivalent bits (e.g. 2.5 3.5)')
    p.add_argument('--uniform', type=int, nargs='*', default=[], help='more uniform baselines (e.g. 2 4)')
    p.add_argument('--variants', nargs='+', default=['raw:full:0'],
                   help='sensitivity variants fisher_weight:fisher_model:iters (iters: AdaRound steps per '
                        'setting, 0: nearest), e.g. raw:full:0 raw:prefix:0 abs_plus_one:full:0 raw:full:50')
    p.add_argument('--plot', default='work_dirs/bench_mixed_precision_digits/tradeoff.png')
    p.add_argument('--json', help='also write the rows to this file')
    p.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mmbrecq  # noqa: F401
    from mmbrecq.mixed_precision import ModelSize, trace_layer_stats
    from mmbrecq.mixed_precision.plot import plot_tradeoff
    cfg, float_model, calib, test_batches, fp_logits, fp_top1 = digits_benchmark_setup(args.num_samples, args.seed)

    # equivalent bits -> MB: ModelSize is linear in the bits of the searched layers
    ref, _ = quantized(float_model, calib, 2)
    stats = trace_layer_stats(ref, calib.forward, calib.batches[0])
    names = [s.name for s in stats]
    size = ModelSize(stats)

    def size_at(bits):
        return size({n: (8 if n in (names[0], names[-1]) else bits, None) for n in names})

    def mb(eq_bits):
        return size_at(2) + (eq_bits - 2) * (size_at(3) - size_at(2))

    print(f'digits test split (360 images), float top-1 {fp_top1:.2f}; calibration {calib.num_samples} train '
          f'images, {args.iters} iterations per unit, seed {args.seed}; A4 (first/last layer W8A8)')
    head = (f'{"setting":54s} {"size MB":>8s} {"nearest":>8s} {"KL near":>8s} {"BRECQ":>7s} {"KL(fp||q)":>10s} '
            f'{"search s":>8s} {"recon s":>8s}')
    print(head)
    rows = []

    def show(r):
        rows.append(r)
        print(f'{r["label"]:54s} {r["size_mb"]:8.4f} {r["nearest_top1"]:8.2f} {r["nearest_kl"]:8.4f} '
              f'{r["top1"]:7.2f} {r["kl"]:10.4f} {r["search_s"]:8.1f} {r["recon_s"]:8.1f}', flush=True)

    tmp = tempfile.mkdtemp(prefix='bench_mp_')
    base = args.budget_bits
    for b in sorted({int(base)} | set(args.uniform)) if float(base).is_integer() else sorted(set(args.uniform)):
        show(run(f'uniform W{b}A4', float_model, calib, test_batches, fp_logits, args, b))
    for eq in [base] + [e for e in args.tradeoff if e != base]:
        for variant in args.variants:
            fw, fm, it = variant.split(':')
            mp = dict(type='GeneticSearcher', budget=dict(size_mb=mb(eq)), candidates=(2, 4, 8), seed=args.seed,
                      sensitivity=dict(fisher_weight=fw, fisher_model=fm, iters=int(it)))
            label = f'mixed W{{2,4,8}} @ W{eq:g} size' + (f' [{variant}]' if len(args.variants) > 1 else '')
            wd = osp.join(tmp, f'{eq}_{fw}_{fm}_{it}')
            show(run(label, float_model, calib, test_batches, fp_logits, args, max(2, int(eq)), mp, wd))
    if len(rows) > 2 and args.plot:
        os.makedirs(osp.dirname(osp.abspath(args.plot)), exist_ok=True)
        pts = [dict(r, label=r['label'].split(' [')[0].replace('mixed W{2,4,8} @ ', 'MP ')) for r in rows]
        plot_tradeoff(pts, args.plot, x='size_mb', y='kl', title='digits A4: KL(fp || q) vs weight size (BRECQ)')
        print(f'trade-off plot: {args.plot}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
