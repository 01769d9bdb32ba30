"""mmbrecq side by side with the reference code: reference BRECQ (github yhhhli/BRECQ),
reference QDrop (github wimh966/QDrop) and mmbrecq, on the same float model, the same
calibration images, the same iterations, over several seeds; one markdown table of top-1 (%)
and mean KL(float || quantized) on the digits test split, mean ± spread over the seeds.

Same inputs for everyone: for each seed the calibration images (train split, training
augmentation, shuffled by the seed) and the test tensors are saved once, after the
model's data preprocessor, to a .pt file; each reference runs in its own process
(``benchmarks/_reference_driver.py``) on those tensors, with the float model rebuilt from the
reference's own ResNet classes and our weights (its float logits are checked against ours
first), and is scored exactly as ``mmbrecq.engine.demo.top1_and_kl`` scores our rows.

Iterations: ``--iters`` is what each implementation spends per reconstruction unit in one
optimisation: mmbrecq (joint rounding + activation steps) and QDrop (joint) run ``iters``
steps per unit; the reference BRECQ runs two passes over the model (rounding, then
activation steps: ``iters_w = iters_a = iters``), as its ``main_imagenet.py`` does.

Bit widths (what each row quantizes; design.md, "Bit-width conventions"):
reference BRECQ: image float, first layer's weights and output 8-bit, last layer's weights
8-bit and its input at ``a_bits``; reference QDrop: image float, first layer's weights 8-bit
and its output at ``a_bits``, last layer's weights and input 8-bit; mmbrecq default: image and
first layer's weights 8-bit, ``layer1.0``'s input at ``a_bits``, last layer's weights and input
8-bit; mmbrecq ``convention='reference'`` (when ``quant_cfg`` has that key): BRECQ's placement.

The reference checkouts are never copied here: pass their paths, e.g.

    git clone https://github.com/yhhhli/BRECQ /tmp/ref/brecq
    git clone https://github.com/wimh966/QDrop /tmp/ref/qdrop
    OMP_NUM_THREADS=1 python benchmarks/bench_vs_reference.py --brecq-ref /tmp/ref/brecq \
        --qdrop-ref /tmp/ref/qdrop --settings w4a4 w3a3 w2a4 w2a2 --seeds 0 1 2 --iters 300 \
        --num-samples 256 --json /tmp/ref_bench.json
    # or BRECQ_REFERENCE=/tmp/ref/brecq QDROP_REFERENCE=/tmp/ref/qdrop python benchmarks/...
    python benchmarks/bench_vs_reference.py --table-from /tmp/ref_bench.json   # the table again
    python benchmarks/bench_vs_reference.py --table-from a.json b.json         # runs split by settings

Without a checkout its rows are skipped with a message (the mmbrecq rows still run).
The reference code is written for CUDA; without a GPU the driver process maps its CUDA
placements to the CPU (with one, it runs as written), and QDrop's config parser gets a
stand-in for ``easydict`` when that package is not installed. ``--impls`` picks rows.
``--json`` is rewritten after every run; ``--resume`` skips the runs already in it.
Spread = half the min–max range over the seeds; a difference smaller than the larger of
the two spreads is a tie.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _seeds import compare, mean_spread

DRIVER = Path(__file__).resolve().parent / '_reference_driver.py'

#: implementation rows: key -> (label, kind, options). kind 'reference': a reference checkout
#: (driver ``--impl``); 'mmbrecq': extra recon / quant_cfg keys for our API.
IMPLS = {
    'ref_brecq': ('reference BRECQ', 'reference', dict(impl='brecq', option='--brecq-ref', env='BRECQ_REFERENCE',
                                                       marker='quant/block_recon.py')),
    'ref_qdrop': ('reference QDrop', 'reference', dict(impl='qdrop', option='--qdrop-ref', env='QDROP_REFERENCE',
                                                       marker='qdrop/solver/recon.py')),
    'brecq': ('mmbrecq default', 'mmbrecq', dict(recon=dict(), quant=dict())),
    'brecq_qdrop': ("mmbrecq input_mix='qdrop'", 'mmbrecq', dict(recon=dict(input_mix='qdrop'), quant=dict())),
    'brecq_convention_ref': ("mmbrecq convention='reference'", 'mmbrecq',
                             dict(recon=dict(), quant=dict(convention='reference'))),
    # activation ranges on the quantized stream instead of the float model (calib.act_stream)
    'brecq_quantized': ("mmbrecq act_stream='quantized'", 'mmbrecq',
                        dict(recon=dict(), quant=dict(), stream='quantized')),
    'brecq_qdrop_quantized': ("mmbrecq input_mix='qdrop', act_stream='quantized'", 'mmbrecq',
                              dict(recon=dict(input_mix='qdrop'), quant=dict(), stream='quantized')),
    'brecq_convention_ref_quantized': ("mmbrecq convention='reference', act_stream='quantized'", 'mmbrecq',
                                       dict(recon=dict(), quant=dict(convention='reference'), stream='quantized')),
}
#: each mmbrecq row is compared with the reference that implements the same method
COMPARE_TO = dict(brecq='ref_brecq', brecq_qdrop='ref_qdrop', brecq_convention_ref='ref_brecq',
                  brecq_quantized='ref_brecq', brecq_qdrop_quantized='ref_qdrop',
                  brecq_convention_ref_quantized='ref_brecq')
#: the rows run unless --impls says otherwise
DEFAULT_IMPLS = ['ref_brecq', 'ref_qdrop', 'brecq', 'brecq_qdrop', 'brecq_convention_ref']
DEFAULT_SETTINGS = ['w4a4', 'w3a3', 'w2a4', 'w2a2']


def parse_setting(setting):
    """``'w4a4'`` -> ``(4, 4)``."""
    try:
        w, a = setting.lower()[1:].split('a')
        if setting.lower()[0] != 'w':
            raise ValueError
        return int(w), int(a)
    except ValueError:
        raise SystemExit(f'--settings: {setting!r} is not of the form wXaY (e.g. w4a4)') from None


# ----------------------------------------------------------------------------- the model
def resnet_arch(float_model):
    """What the reference-layout network needs of an mmpretrain ResNet classifier of BasicBlocks:
    stem, max-pool, blocks, widths and strides per stage, classes. Other models: a clear error."""
    from mmpretrain.models.backbones.resnet import BasicBlock

    backbone, head = float_model.backbone, getattr(float_model, 'head', None)
    name = type(backbone).__name__
    if name not in ('ResNet', 'ResNet_CIFAR') or getattr(backbone, 'deep_stem', False):
        raise SystemExit(f'--model: the reference code maps only onto a plain ResNet (BasicBlock) backbone, '
                         f'got {name}')
    layers = [getattr(backbone, n) for n in backbone.res_layers]
    if not all(isinstance(b, BasicBlock) for layer in layers for b in layer):
        raise SystemExit('--model: the reference mapping supports BasicBlock ResNets only (ResNet-18/34 layout)')
    if head is None or not hasattr(head, 'fc') or type(float_model.neck).__name__ != 'GlobalAveragePooling':
        raise SystemExit('--model: expected GlobalAveragePooling and a linear head with .fc (reference avgpool + fc)')
    conv1 = backbone.conv1
    return dict(stem=dict(channels=conv1.out_channels, kernel=conv1.kernel_size[0], stride=conv1.stride[0],
                          padding=conv1.padding[0]),
                maxpool=name == 'ResNet',
                stage_blocks=[len(layer) for layer in layers],
                widths=[layer[0].conv2.out_channels for layer in layers],
                strides=list(backbone.strides[:len(layers)]),
                num_classes=head.fc.out_features)


def save_shared_tensors(path, float_model, calib, test_batches, fp_logits):
    """What every implementation of this seed sees: the preprocessed calibration images, the
    test tensors with labels and float logits, the float weights and the architecture."""
    torch.save(dict(
        cali=torch.cat([b['inputs'] for b in calib.batches]),
        test_inputs=[b['inputs'] for b in test_batches],
        test_labels=[torch.cat([s.gt_label for s in b['data_samples']]) for b in test_batches],
        fp_logits=list(fp_logits),
        float_state_dict=float_model.state_dict(),
        arch=resnet_arch(float_model),
    ), path)


# ----------------------------------------------------------------------------- the runs
def run_mmbrecq(setting, options, iters, seed, float_model, calib, test_batches, fp_logits):
    """One mmbrecq row: quantize, activation ranges on the first calibration batch (64 images,
    as the reference's ``cali_data[:64]``; on the float model unless the row says
    ``stream='quantized'``), reconstruct, score. ``seconds``: from the
    activation ranges on (the reference driver's: from building the model on)."""
    import mmbrecq
    from mmbrecq.engine.demo import top1_and_kl

    w, a = parse_setting(setting)
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), dict(options['quant'], w_bits=w, a_bits=a))
    t0 = time.perf_counter()
    mmbrecq.set_quant_state(model, True, True)
    mmbrecq.calibrate_activations(model, calib.batches[:1], calib.forward, stream=options.get('stream', 'auto'))
    mmbrecq.reconstruct(model, calib, dict(iters=iters, progress=False, seed=seed, **options['recon']),
                        logger='silent')
    seconds = time.perf_counter() - t0
    top1, kl = top1_and_kl(model, test_batches, fp_logits)
    return dict(top1=top1, kl=kl, seconds=seconds)


def run_reference(impl, ref, data_path, setting, iters, seed, log_path):
    """One reference row in its own process (``_reference_driver.py``); its output goes to
    ``log_path``. Returns the row, or None (with the log's tail printed) if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'result.json')
        cmd = [sys.executable, str(DRIVER), '--impl', impl, '--ref', ref, '--data', data_path, '--setting', setting,
               '--iters', str(iters), '--seed', str(seed), '--out', out]
        with open(log_path, 'w') as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0 or not os.path.exists(out):
            tail = Path(log_path).read_text().splitlines()[-25:]
            print(f'reference {impl} {setting} seed {seed} failed (exit {rc}); log {log_path}:\n  '
                  + '\n  '.join(tail), flush=True)
            return None
        with open(out) as f:
            r = json.load(f)
    return dict(top1=r['top1'], kl=r['kl'], seconds=r['seconds'], float_logit_diff=r['float_logit_diff'])


def reference_paths(args):
    """``{impl key: checkout}`` for the references found; a message for each one skipped."""
    found = {}
    for key, (label, kind, opt) in IMPLS.items():
        if kind != 'reference' or key not in args.impls:
            continue
        path = getattr(args, opt['option'][2:].replace('-', '_')) or os.environ.get(opt['env'])
        if not path:
            print(f'{label} rows skipped: no checkout (pass {opt["option"]} PATH or set {opt["env"]})')
            continue
        if not (Path(path) / opt['marker']).is_file():
            raise SystemExit(f'{opt["option"]} / {opt["env"]}: {path!r} is not a checkout of the reference '
                             f'(no {opt["marker"]})')
        found[key] = str(Path(path).resolve())
    return found


def has_convention_key():
    """Whether this mmbrecq has ``quant_cfg.convention`` (the reference's bit-width placement)."""
    from mmbrecq.config.quant_cfg import DEFAULTS
    return 'convention' in DEFAULTS


# ----------------------------------------------------------------------------- the table
def summarize(rows):
    """``{(setting, impl): dict(top1=(mean, spread), kl=(mean, spread), seeds=n)}`` from per-seed rows."""
    groups = {}
    for r in rows:
        groups.setdefault((r['setting'], r['impl']), []).append(r)
    return {k: dict(top1=mean_spread(r['top1'] for r in g), kl=mean_spread(r['kl'] for r in g), seeds=len(g))
            for k, g in groups.items()}


def _fmt(ms, digits):
    return f'{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}'


def markdown_table(rows, settings, impls, float_top1=None, header=''):
    """The markdown table: per setting, one row per implementation; the best mean top-1 / KL of a
    setting and every value tied with it in bold; each mmbrecq row against its reference."""
    stats = summarize(rows)
    lines = [header] if header else []
    if float_top1 is not None:
        lines.append(f'Float model: top-1 {float_top1:.2f} %.')
    lines += ['', '| setting | implementation | seeds | top-1 (%) | KL(float‖quant) | vs reference (top-1 / KL) |',
              '|---|---|---|---|---|---|']
    for setting in settings:
        present = [k for k in impls if (setting, k) in stats]
        if not present:
            continue
        best_top1 = max((stats[(setting, k)]['top1'] for k in present), key=lambda m: m[0])
        best_kl = min((stats[(setting, k)]['kl'] for k in present), key=lambda m: m[0])
        for k in present:
            s = stats[(setting, k)]
            top1, kl = _fmt(s['top1'], 2), _fmt(s['kl'], 4)
            if compare(s['top1'], best_top1, True) == 'tie':
                top1 = f'**{top1}**'
            if compare(s['kl'], best_kl, False) == 'tie':
                kl = f'**{kl}**'
            ref = COMPARE_TO.get(k)
            if ref and (setting, ref) in stats:
                r = stats[(setting, ref)]
                vs = (f'{compare(s["top1"], r["top1"], True)} ({s["top1"][0] - r["top1"][0]:+.2f}) / '
                      f'{compare(s["kl"], r["kl"], False)} ({s["kl"][0] - r["kl"][0]:+.4f}) vs {IMPLS[ref][0]}')
            else:
                vs = '–'
            lines.append(f'| {setting.upper()} | {IMPLS[k][0]} | {s["seeds"]} | {top1} | {kl} | {vs} |')
    return '\n'.join(lines)


def table_header(args):
    seeds = ' '.join(str(s) for s in args.seeds)
    return (f'digits {args.model}, {args.num_samples} calibration images, seeds {seeds}; {args.iters} iterations per '
            f'unit (reference BRECQ: iters_w = iters_a = {args.iters}, two passes; QDrop and mmbrecq: one joint '
            f'pass); mean ± spread over seeds, spread = half the min–max range; a difference smaller than the '
            f'larger spread is a tie; bold: best of the setting or tied with it.')


def table_from_files(paths):
    """The table of one or more ``--json`` files (e.g. runs split by settings), rows merged."""
    saved = []
    for path in paths:
        with open(path) as f:
            saved.append(json.load(f))
    rows = [r for s in saved for r in s['rows']]
    settings = list(dict.fromkeys(x for s in saved for x in s['settings']))
    impls = [k for k in IMPLS if any(k in s['impls'] for s in saved)]
    return markdown_table(rows, settings, impls, saved[0].get('float_top1'), saved[0].get('header', ''))


# ----------------------------------------------------------------------------- main
def main():
    from mmbrecq.engine.demo import DIGITS_MODELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--brecq-ref', help='checkout of github.com/yhhhli/BRECQ (or env BRECQ_REFERENCE)')
    p.add_argument('--qdrop-ref', help='checkout of github.com/wimh966/QDrop (or env QDROP_REFERENCE)')
    p.add_argument('--settings', nargs='+', default=DEFAULT_SETTINGS)
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--iters', type=int, default=300, help='iterations per unit (see the docstring)')
    p.add_argument('--num-samples', type=int, default=256, help='calibration images')
    p.add_argument('--impls', nargs='+', default=DEFAULT_IMPLS, choices=list(IMPLS))
    p.add_argument('--model', default='resnet18', choices=sorted(DIGITS_MODELS),
                   help='a digits demo float model with a ResNet (BasicBlock) backbone')
    p.add_argument('--json', help='write the per-seed rows here (after every run)')
    p.add_argument('--resume', action='store_true', help='keep the runs already in --json')
    p.add_argument('--log-dir', help='reference runs\' logs (default: a temporary folder)')
    p.add_argument('--table-from', nargs='+', help='print the table of --json files (rows merged) and exit')
    args = p.parse_args()
    for s in args.settings:
        parse_setting(s)
    if args.table_from:
        print(table_from_files(args.table_from))
        return

    import mmbrecq  # noqa: F401  (registers the plugin)
    from mmbrecq.engine.demo import digits_benchmark_setup

    refs = reference_paths(args)
    impls = [k for k in args.impls if IMPLS[k][1] == 'mmbrecq' or k in refs]
    if 'brecq_convention_ref' in impls and not has_convention_key():
        print("mmbrecq convention='reference' rows skipped: this mmbrecq has no quant_cfg.convention")
        impls.remove('brecq_convention_ref')
    rows = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            saved = json.load(f)
        rows = saved['rows']
        impls_in_table = [k for k in IMPLS if k in impls or k in saved['impls']]
    else:
        impls_in_table = impls
    done = {(r['setting'], r['impl'], r['seed']) for r in rows}
    log_dir = args.log_dir or tempfile.mkdtemp(prefix='bench_vs_reference_')
    os.makedirs(log_dir, exist_ok=True)
    print(table_header(args))
    print(f'rows: {", ".join(IMPLS[k][0] for k in impls)}; reference logs in {log_dir}', flush=True)
    float_top1 = None

    def save():
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(dict(rows=rows, settings=args.settings, impls=impls_in_table, float_top1=float_top1,
                               header=table_header(args), command=' '.join(sys.argv)), f, indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            _, float_model, calib, test_batches, fp_logits, float_top1 = digits_benchmark_setup(
                args.num_samples, seed, model=args.model)
            data_path = os.path.join(tmp, f'seed{seed}.pt')
            if refs:
                save_shared_tensors(data_path, float_model, calib, test_batches, fp_logits)
            for setting in args.settings:
                for k in impls:
                    if (setting, k, seed) in done:
                        continue
                    label, kind, opt = IMPLS[k]
                    if kind == 'reference':
                        log = os.path.join(log_dir, f'{k}_{setting}_seed{seed}.log')
                        r = run_reference(opt['impl'], refs[k], data_path, setting, args.iters, seed, log)
                        if r is None:
                            continue
                    else:
                        r = run_mmbrecq(setting, opt, args.iters, seed, float_model, calib, test_batches, fp_logits)
                    rows.append(dict(setting=setting, impl=k, seed=seed, **r))
                    print(f'{setting:5s} seed {seed} {label:32s} top-1 {r["top1"]:6.2f}  KL {r["kl"]:.4f}  '
                          f'{r["seconds"]:7.1f} s', flush=True)
                    save()
    save()
    print()
    print(markdown_table(rows, args.settings, impls_in_table, float_top1, table_header(args)))


if __name__ == '__main__':
    main()
