"""Vectorised per-channel Lp range search vs. a per-channel Python loop, on ResNet-50 weights.

The reference BRECQ code searches each output channel separately; ``lp_search_range``
searches all channels of a layer at once. This script times both on the conv/linear
weights of ResNet-50 (``torchvision.models.resnet50(weights=None)``: random init, the
shapes are what matters; without torchvision, random tensors with the same shapes), and
checks that both give bit-identical ranges.

The loop is slow (tens of thousands of channels), so by default it is timed on
``--loop-channels`` channels per layer and its time extrapolated linearly to all
channels; the output says when it did so. ``--loop-channels 0`` times the full loop.

Both run single-threaded by default (``--threads``), which compares the algorithms rather
than thread scheduling on a small machine.

Usage:
    python benchmarks/bench_range_search.py [--layers N] [--bits 4] [--loop-channels 8] [--threads 1]
"""
import argparse
import sys
import time
from collections import OrderedDict

import torch

from mmbrecq.quantizers.range_search import lp_search_range

# (name, shape) of every conv and linear weight of torchvision's ResNet-50, in module order;
# used only when torchvision cannot be imported
_RESNET50_STAGES = [(3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2)]


def _resnet50_shapes_by_hand():
    shapes = [('conv1', (64, 3, 7, 7))]
    in_ch = 64
    for stage, (blocks, width, out_ch, _) in enumerate(_RESNET50_STAGES, start=1):
        for b in range(blocks):
            p = f'layer{stage}.{b}'
            shapes += [(f'{p}.conv1', (width, in_ch, 1, 1)), (f'{p}.conv2', (width, width, 3, 3)),
                       (f'{p}.conv3', (out_ch, width, 1, 1))]
            if b == 0:
                shapes.append((f'{p}.downsample.0', (out_ch, in_ch, 1, 1)))
            in_ch = out_ch
    shapes.append(('fc', (1000, 2048)))
    return shapes


def resnet50_weights(seed):
    """List of (name, weight) for all conv/linear layers, and a note on where they came from."""
    try:
        import torchvision
        torch.manual_seed(seed)
        model = torchvision.models.resnet50(weights=None)
        layers = [(n, m.weight.detach().clone()) for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        return layers, 'torchvision.models.resnet50(weights=None), random init'
    except Exception as exc:  # noqa: BLE001 - any import problem: fall back to the shapes
        g = torch.Generator().manual_seed(seed)
        layers = []
        for name, shape in _resnet50_shapes_by_hand():
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            layers.append((name, torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5))
        return layers, f'random tensors with ResNet-50 shapes (torchvision unavailable: {exc})'


def group_of(name):
    """Layer group for the summary: stem, layer1..4, fc."""
    if name.startswith('layer'):
        return name.split('.')[0]
    return 'stem' if name.startswith('conv1') else name


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--layers', type=int, default=None,
                        help='only the first N conv/linear layers (default: all 54)')
    parser.add_argument('--bits', type=int, default=4)
    parser.add_argument('--symmetric', action='store_true', help='symmetric signed grid')
    parser.add_argument('--num-candidates', type=int, default=100)
    parser.add_argument('--p', type=float, default=2.4)
    parser.add_argument('--loop-channels', type=int, default=8,
                        help='channels per layer on which the loop is timed and extrapolated '
                        '(0: time the loop on every channel)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch.set_num_threads (default 1: on a small shared machine, OpenMP '
                        'regions with more threads stall and swamp the timings; 0 keeps torch\'s default)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.symmetric:
        qmin, qmax = -(1 << (args.bits - 1)), (1 << (args.bits - 1)) - 1
    else:
        qmin, qmax = 0, (1 << args.bits) - 1
    layers, source = resnet50_weights(args.seed)
    if args.layers is not None:
        layers = layers[:args.layers]
    kw = dict(qmin=qmin, qmax=qmax, symmetric=args.symmetric, p=args.p,
              num_candidates=args.num_candidates)

    total_ch = sum(w.shape[0] for _, w in layers)
    total_el = sum(w.numel() for _, w in layers)
    extrapolate = args.loop_channels > 0
    print(f'weights: {source}')
    print(f'{len(layers)} layers, {total_ch} output channels, {total_el / 1e6:.2f} M weights; '
          f'{args.bits}-bit {"symmetric" if args.symmetric else "asymmetric"}, '
          f'{args.num_candidates} candidates, p={args.p}, torch threads={torch.get_num_threads()}')
    if extrapolate:
        print(f'NOTE: the per-channel loop is timed on {args.loop_channels} evenly spaced channels of each '
              'layer and its time is extrapolated linearly to all channels; '
              'ranges are compared on those measured channels.')
    else:
        print('the per-channel loop is timed on every channel (no extrapolation)')

    # warm-up (allocator, first-call overheads) outside the timings
    lp_search_range(layers[0][1][:2], ch_axis=0, **kw)
    lp_search_range(layers[0][1][0], ch_axis=None, **kw)

    groups = OrderedDict()
    mismatches, compared = 0, 0
    for name, w in layers:
        c = w.shape[0]
        t0 = time.perf_counter()
        lo, hi = lp_search_range(w, ch_axis=0, **kw)
        t_vec = time.perf_counter() - t0

        if extrapolate and args.loop_channels < c:
            idx = torch.linspace(0, c - 1, args.loop_channels).round().long().unique().tolist()
        else:
            idx = list(range(c))
        t0 = time.perf_counter()
        loop = [lp_search_range(w[i], ch_axis=None, **kw) for i in idx]
        t_loop_measured = time.perf_counter() - t0
        t_loop = t_loop_measured * c / len(idx)

        for i, (lo_i, hi_i) in zip(idx, loop):
            compared += 1
            if not (torch.equal(lo[i], lo_i) and torch.equal(hi[i], hi_i)):
                mismatches += 1

        g = groups.setdefault(group_of(name), dict(layers=0, channels=0, measured=0, vec=0.0, loop=0.0))
        g['layers'] += 1
        g['channels'] += c
        g['measured'] += len(idx)
        g['vec'] += t_vec
        g['loop'] += t_loop

    loop_hdr = 'loop (s, extrap.)' if extrapolate else 'loop (s)'
    print()
    print(f'{"group":<8} {"layers":>6} {"channels":>9} {"measured":>9} {"vectorised (s)":>15} '
          f'{loop_hdr:>18} {"speed-up":>9}')
    tot_vec = tot_loop = 0.0
    for gname, g in groups.items():
        tot_vec += g['vec']
        tot_loop += g['loop']
        print(f'{gname:<8} {g["layers"]:>6} {g["channels"]:>9} {g["measured"]:>9} {g["vec"]:>15.3f} '
              f'{g["loop"]:>18.3f} {g["loop"] / g["vec"]:>8.1f}x')
    print(f'{"total":<8} {len(layers):>6} {total_ch:>9} {sum(g["measured"] for g in groups.values()):>9} '
          f'{tot_vec:>15.3f} {tot_loop:>18.3f} {tot_loop / tot_vec:>8.1f}x')
    print()
    print(f'speed-up (loop / vectorised), total: {tot_loop / tot_vec:.1f}x'
          + (' (loop time extrapolated from measured channels)' if extrapolate else ''))
    status = 'identical' if mismatches == 0 else f'{mismatches} MISMATCHES'
    print(f'ranges on the {compared} measured channels: {status}')
    return 0 if mismatches == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
