"""End-to-end reconstruction time of a whole mmpretrain ResNet-18, split by stage.

Capture must not grow with depth: a unit whose input is the previous unit's output is
fed from the cached streams (float and quantized) instead of re-running the network's
prefix from the images. For each unit this prints the capture time next to the time of
one float forward of that unit over the calibration set (its own compute): their ratio
should stay roughly flat from the first unit to the last, not grow with the index.
The Fisher pass is listed apart: by definition it needs the rest of the network
(a forward and a backward of the quantized model up to the logits) once per unit.

    python benchmarks/bench_recon_end_to_end.py [--samples 256] [--iters 100] [--res 224]
        [--loss fisher_diag|mse]

``--samples 1024 --iters 2`` is the paper's calibration size at 224x224: it shows where the
caches go and the peak memory on the machine at hand.
"""
import argparse
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--samples', type=int, default=256)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--iters', type=int, default=100)
    p.add_argument('--res', type=int, default=224)
    p.add_argument('--loss', default='fisher_diag', choices=['fisher_diag', 'mse'])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()

    from mmengine.hub import get_config
    from mmpretrain.registry import MODELS

    import mmbrecq
    from mmbrecq.modules import set_quant_state
    from mmbrecq.reconstruction import CalibrationSet, find_units, probe_units

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MODELS.build(get_config('mmpretrain::resnet/resnet18_8xb32_in1k.py').model).eval().to(device)
    qmodel = mmbrecq.quantize_model(model, dict(w_bits=4, a_bits=4))
    images = torch.randn(args.samples, 3, args.res, args.res, device=device)
    calib = CalibrationSet(list(images.split(args.batch_size)), lambda m, b: m(b, mode='tensor'))
    set_quant_state(qmodel, True, True)
    mmbrecq.calibrate_activations(qmodel, calib.batches[:1], calib.forward)

    # each unit's own compute: one float forward over the calibration set
    units, traces = probe_units(qmodel, find_units(qmodel), calib)
    set_quant_state(qmodel, False, False)
    own = {}
    with torch.no_grad():
        for u in units:
            x = torch.randn(args.batch_size, *traces[u.name].in_shapes[0], device=device)
            u.forward(x)
            t0 = time.perf_counter()
            for _ in range(len(calib.batches)):
                u.forward(x)
            own[u.name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    records = mmbrecq.reconstruct(qmodel, calib, dict(iters=args.iters, loss=args.loss, progress=False),
                                  logger='silent')
    total = time.perf_counter() - t0
    print(f'ResNet-18 {args.res}x{args.res}, {args.samples} calibration images, {args.iters} iterations per '
          f'unit, loss={args.loss}, device={device}')
    print(f'{"unit":20s} {"chained":>7s} {"capture s":>9s} {"own fwd s":>9s} {"capture/own":>11s} '
          f'{"fisher s":>8s} {"optim s":>8s}')
    for r in records:
        ratio = r['capture_s'] / max(own[r['name']], 1e-9)
        print(f'{r["name"]:20s} {str(r["chained"]):>7s} {r["capture_s"]:9.2f} {own[r["name"]]:9.2f} {ratio:11.2f} '
              f'{r["fisher_s"]:8.2f} {r["optim_s"]:8.2f}')
    cap = sum(r['capture_s'] for r in records)
    fis = sum(r['fisher_s'] for r in records)
    opt = sum(r['optim_s'] for r in records)
    print(f'total {total:.1f}s = capture {cap:.1f}s + fisher {fis:.1f}s + optimisation {opt:.1f}s '
          f'(+ {total - cap - fis - opt:.1f}s setup)')
    import resource
    print(f'cache placement per unit: {sorted({r["cache"].split(" on ")[-1] for r in records})}; '
          f'largest unit cache: {max(float(r["cache"].split()[0]) for r in records):.0f} MiB; peak host memory '
          f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB')
    chained = [r for r in records if r['chained']]
    if len(chained) >= 2:
        first, last = chained[0], chained[-1]
        r1 = first['capture_s'] / own[first['name']]
        r2 = last['capture_s'] / own[last['name']]
        print(f'capture/own-compute, first chained unit ({first["name"]}): {r1:.2f}; last ({last["name"]}): '
              f'{r2:.2f}; last/first = {r2 / r1:.2f} (flat = no growth with depth)')


if __name__ == '__main__':
    main()
