"""Fused CPU kernels (mmbrecq.ops) against the torch code they replace, on one activation.

For a 32x64x56x56 float32 activation (a ResNet-18 layer1 output at batch 32), prints the
milliseconds of each reconstruction-loop node with the kernel and with the torch fallback,
forward and backward separately, and the ratio torch / kernel, all measured in this run:

* ``fake_quant_lsq``: the LSQ fake quantizer (x and step both need gradients)
* ``reconstruction_loss``: the Fisher-weighted squared error
* ``quantized_reconstruction_loss``: output quantizer + loss fused in one node, against the
  torch composition ``reconstruction_loss(quantizer(out), y, w)``

Kernel and torch rounds alternate and each figure is the minimum over the rounds (the
median is printed too), which filters out interference from other processes.

    python benchmarks/bench_fused_kernels.py [--threads 2] [--rounds 7] [--reps 5]
        [--shape 32 64 56 56] [--fresh-build] [--isa isa_base|isa_avx2|isa_avx512]

``--fresh-build`` compiles the extension in an empty temporary directory first, to time a
first use on a new machine (otherwise the cached build is loaded).
"""
import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time

import torch


def timed(fn, reps):
    """Seconds of the fastest of ``reps`` calls of ``fn(prepare())`` pairs: ``fn`` returns
    the callable to time (so that untimed set-up, e.g. a forward pass, can run first)."""
    best = float('inf')
    for _ in range(reps):
        run = fn()
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def make_cases(shape):
    from mmbrecq.quantizers import LSQQuantizer
    from mmbrecq.quantizers.functional import fake_quant_lsq
    from mmbrecq.reconstruction.objective import quantized_reconstruction_loss, reconstruction_loss

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 1).requires_grad_()
    y = torch.randn(shape, generator=g) + 1
    w = torch.rand(shape, generator=g) * 2
    grad = torch.randn(shape, generator=g)
    q = LSQQuantizer(bits=4)
    q.scale.data.fill_(0.4)
    q.zero_point.fill_(3.0)
    q.initialized = True
    q.train()
    s = q.scale
    z = q.zero_point
    factor = 1.0 / (x[0].numel() * q.qmax) ** 0.5

    def fq_fwd():
        return lambda: fake_quant_lsq(x, s, z, q.qmin, q.qmax, factor)

    def fq_bwd():
        out = fake_quant_lsq(x, s, z, q.qmin, q.qmax, factor)
        return lambda: torch.autograd.grad(out, (x, s), grad)

    def loss_fwd():
        return lambda: reconstruction_loss(x, y, w)

    def loss_bwd():
        loss = reconstruction_loss(x, y, w)
        return lambda: torch.autograd.grad(loss, (x, ))

    def qloss_fwd():
        return lambda: quantized_reconstruction_loss(x, q, y, w)

    def qloss_bwd():
        loss = quantized_reconstruction_loss(x, q, y, w)
        return lambda: torch.autograd.grad(loss, (x, s))

    return [('fake_quant_lsq', 'fwd', fq_fwd), ('fake_quant_lsq', 'bwd', fq_bwd),
            ('reconstruction_loss (weighted)', 'fwd', loss_fwd), ('reconstruction_loss (weighted)', 'bwd', loss_bwd),
            ('quantized_reconstruction_loss', 'fwd', qloss_fwd), ('quantized_reconstruction_loss', 'bwd', qloss_bwd)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', type=int, nargs='+', default=[32, 64, 56, 56])
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--rounds', type=int, default=7, help='alternating kernel / torch rounds')
    p.add_argument('--reps', type=int, default=5, help='calls per round (the fastest is kept)')
    p.add_argument('--fresh-build', action='store_true', help='compile the extension in an empty directory first')
    p.add_argument('--isa', default=None, help='kernel instruction set version (default: the best supported)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh_build:
        build_dir = tempfile.mkdtemp(prefix='mmbrecq_ext_')
        atexit.register(shutil.rmtree, build_dir, ignore_errors=True)
        os.environ['TORCH_EXTENSIONS_DIR'] = build_dir
    from mmbrecq.ops import cpu_kernels

    t0 = time.perf_counter()
    module = cpu_kernels.get_cpu_kernels()
    first_use = time.perf_counter() - t0
    if module is None:
        raise SystemExit(f'fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}')
    if args.isa:
        module.set_isa(args.isa)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, shape {tuple(args.shape)}, '
          f'kernel ISA {module.current_isa()} (supported: {", ".join(module.isa_names())})')
    print(f'extension first use: {first_use:.1f} s ({"compiled" if args.fresh_build else "cached build or compiled"})')

    cases = make_cases(tuple(args.shape))
    times = {(name, phase): ([], []) for name, phase, _ in cases}
    for _ in range(args.rounds):
        for name, phase, fn in cases:
            kern, ref = times[(name, phase)]
            kern.append(timed(fn, args.reps))
            with cpu_kernels.disabled():
                ref.append(timed(fn, args.reps))
    print(f'\n{"op":32s} {"pass":4s} {"kernel ms":>10s} {"torch ms":>10s} {"torch/kernel":>13s}'
          f'   (median kernel / torch ms)')
    for name, phase, _ in cases:
        kern, ref = times[(name, phase)]
        k, r = min(kern) * 1e3, min(ref) * 1e3
        print(f'{name:32s} {phase:4s} {k:10.2f} {r:10.2f} {r / k:12.1f}x   '
              f'({statistics.median(kern) * 1e3:.2f} / {statistics.median(ref) * 1e3:.2f})')
    tot_k = sum(min(times[c[:2]][0]) for c in cases if c[0] != 'quantized_reconstruction_loss')
    tot_r = sum(min(times[c[:2]][1]) for c in cases if c[0] != 'quantized_reconstruction_loss')
    fused = sum(min(times[c[:2]][0]) for c in cases if c[0] == 'quantized_reconstruction_loss')
    print(f'\noutput quantizer + loss per step (fwd + bwd): torch {tot_r * 1e3:.2f} ms, '
          f'kernels node by node {tot_k * 1e3:.2f} ms, fused node {fused * 1e3:.2f} ms')


if __name__ == '__main__':
    main()
