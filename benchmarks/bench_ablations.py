"""Every deviation of mmbrecq's recipe from the reference BRECQ code, measured over seeds.

Each variant changes one thing of mmbrecq's default (or, for ``reference_recipe``, all of
them) on the same float model, calibration images and iterations; every row is top-1 (%)
and mean KL(float || quantized) over ``--seeds`` (mean ± half the min-max range; the
calibration images and the reconstruction seed both follow the seed). A difference within
the spread is a tie. The verdict column compares each variant with the default.

    python benchmarks/bench_ablations.py [--model resnet18] [--settings w2a2 w4a4]
        [--seeds 0 1 2] [--iters 300] [--num-samples 256] [--variants default mse ...]
        [--act-stream float|quantized]
        [--json rows.json]
"""
import argparse
import copy
import json
import time

import torch
from _seeds import cell, verdict

from mmbrecq.engine.demo import DIGITS_MODELS, digits_benchmark_setup, top1_and_kl


def variants(first, after_first, last, a_bits):
    """name -> (quant_cfg extras, recon extras, activation-range init: 64 = the first batch,
    None = all calibration images, 'other' = the first batch on the other stream than
    ``--act-stream``).

    ``first`` / ``after_first`` / ``last``: the float model's first layer, the layer reading
    its output, its last layer (the bit-placement ablations override their input bits).
    """
    return {
        'default': ({}, {}, 64),
        # loss: the Fisher weighting (|g|+1)^2 vs the reference main script's plain MSE
        'mse': ({}, dict(loss='mse'), 64),
        # bit placement, one tensor at a time, then the reference's whole convention
        'image_float': (dict(overrides=[dict(pattern=first, a_bits=None)]), {}, 64),
        'stem_out_8bit': (dict(overrides=[dict(pattern=after_first, a_bits=8)]), {}, 64),
        'last_in_abits': (dict(overrides=[dict(pattern=last, a_bits=a_bits)]), {}, 64),
        'convention_reference': (dict(convention='reference'), {}, 64),
        # schedule: per-unit two stages, the reference's global order (both at its 4e-4 step lr)
        'two_stage': ({}, dict(act_mode='two_stage', act_lr=4e-4), 64),
        'two_pass': ({}, dict(act_mode='two_pass', act_lr=4e-4), 64),
        # activation range init on all calibration images instead of the first batch (64), and
        # on the other stream (float model <-> quantized stream, see --act-stream)
        'act_init_all': ({}, {}, None),
        'act_stream_other': ({}, {}, 'other'),
        'qdrop_act_stream_other': ({}, dict(input_mix='qdrop'), 'other'),
        'act_lr_4e-4': ({}, dict(act_lr=4e-4), 64),
        'batch_64': ({}, dict(batch_size=64), 64),
        # QDrop: probability of keeping the quantized value, and with the QDrop code's MSE loss
        'qdrop': ({}, dict(input_mix='qdrop'), 64),
        'qdrop_p0.75': ({}, dict(input_mix='qdrop', qdrop_prob=0.75), 64),
        'qdrop_input_only': ({}, dict(input_mix='qdrop', qdrop_placement='input'), 64),
        'qdrop_inner_only': ({}, dict(input_mix='qdrop', qdrop_placement='inner'), 64),
        'qdrop_mse': ({}, dict(input_mix='qdrop', loss='mse'), 64),
        # everything as the reference code: placement, MSE, global order, its step lr
        'reference_recipe': (dict(convention='reference'), dict(loss='mse', act_mode='two_pass', act_lr=4e-4), 64),
    }


OTHER_STREAM = dict(float='quantized', quantized='float')


def run(setting, name, spec, args, float_model, calib, test_batches, fp_logits, seed):
    import mmbrecq
    quant_extra, recon_extra, init_images = spec
    w, a = (int(x) for x in setting[1:].split('a'))
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), dict(quant_extra, w_bits=w, a_bits=a))
    mmbrecq.set_quant_state(model, True, True)
    init = [_concat(calib.batches)] if init_images is None else calib.batches[:1]
    stream = args.act_stream if init_images != 'other' else OTHER_STREAM[args.act_stream]
    mmbrecq.calibrate_activations(model, init, calib.forward, stream=stream)
    t0 = time.perf_counter()
    mmbrecq.reconstruct(model, calib, dict(iters=args.iters, progress=False, seed=seed, **recon_extra),
                        logger='silent')
    seconds = time.perf_counter() - t0
    top1, kl = top1_and_kl(model, test_batches, fp_logits)
    return dict(setting=setting, variant=name, seed=seed, top1=top1, kl=kl, seconds=seconds)


def _concat(batches):
    """One batch of every calibration image (the data preprocessor's dict of inputs + samples)."""
    return dict(inputs=torch.cat([b['inputs'] for b in batches]),
                data_samples=[s for b in batches for s in b['data_samples']])


def table(rows, settings, names):
    lines = ['| variant | ' + ' | '.join(f'{s.upper()} top-1 | {s.upper()} KL' for s in settings) + ' |',
             '|---|' + '---|---|' * len(settings)]
    for name in names:
        cells = []
        for s in settings:
            mine = [r for r in rows if r['setting'] == s and r['variant'] == name]
            ref = [r for r in rows if r['setting'] == s and r['variant'] == 'default']
            if not mine:
                cells += ['–', '–']
                continue
            t, k = [r['top1'] for r in mine], [r['kl'] for r in mine]
            vt = verdict(t, [r['top1'] for r in ref], True) if name != 'default' and ref else ''
            vk = verdict(k, [r['kl'] for r in ref], False) if name != 'default' and ref else ''
            cells += [f'{cell(t, 2)} {vt}'.strip(), f'{cell(k, 4)} {vk}'.strip()]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet18', choices=sorted(DIGITS_MODELS))
    p.add_argument('--settings', nargs='+', default=['w2a2', 'w4a4'])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--iters', type=int, default=300)
    p.add_argument('--num-samples', type=int, default=256)
    p.add_argument('--variants', nargs='+', default=None, help='default: all')
    p.add_argument('--act-stream', default='float', choices=sorted(OTHER_STREAM),
                   help="activation ranges of every variant (quant_cfg.calib.act_stream; default 'float', "
                        "what 'auto' picks for these CNNs)")
    p.add_argument('--json', help='also write the rows to this file (rewritten after every run)')
    p.add_argument('--tables-from', nargs='+', metavar='JSON',
                   help='print the table of saved runs (several --json files, e.g. one per seed) and exit')
    args = p.parse_args()
    if args.tables_from:
        rows = [r for path in args.tables_from for r in json.load(open(path))['rows']]
        settings = list(dict.fromkeys(r['setting'] for r in rows))
        print(f'seeds {sorted({r["seed"] for r in rows})} (mean ± half range; tie/better/worse vs default)\n')
        print(table(rows, settings, list(dict.fromkeys(r['variant'] for r in rows))))
        return

    from mmbrecq.modules import quantizable_layers
    rows = []
    names = None
    for seed in args.seeds:
        _, float_model, calib, test_batches, fp_logits, fp_top1 = digits_benchmark_setup(
            args.num_samples, seed, model=args.model)
        layers = quantizable_layers(float_model)
        for setting in args.settings:
            a_bits = int(setting.split('a')[1])
            specs = variants(layers[0], layers[1], layers[-1], a_bits)
            names = args.variants or list(specs)
            unknown = sorted(set(names) - set(specs))
            if unknown:
                raise SystemExit(f'unknown variant(s) {unknown}; choose from {sorted(specs)}')
            for name in names:
                r = run(setting, name, specs[name], args, float_model, calib, test_batches, fp_logits, seed)
                rows.append(r)
                print(f'seed {seed} {setting} {name:22s} top-1 {r["top1"]:6.2f} KL {r["kl"]:.4f} '
                      f'({r["seconds"]:.0f} s)', flush=True)
                if args.json:
                    with open(args.json, 'w') as f:
                        json.dump(dict(float_top1=fp_top1, rows=rows), f, indent=1)
    print(f'\n{args.model}, digits test split, {args.num_samples} calibration images, {args.iters} iterations '
          f'per unit, seeds {args.seeds} (mean ± half range; tie/better/worse vs default)\n')
    print(table(rows, args.settings, names))


if __name__ == '__main__':
    main()
