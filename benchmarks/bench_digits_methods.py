"""FP / nearest / layer-wise AdaRound / BRECQ / BRECQ+QDrop on the digits demo model.

Accuracy saturates on easy data, so besides top-1 this prints the mean KL divergence
of the quantized logits from the float logits on the test split, which still ranks the
methods. All methods share one calibration set (train split, training augmentation)
and one seed; each row is measured in this run.

    python benchmarks/bench_digits_methods.py [--settings w4a4 w2a4 w3a3 w2a2]
        [--iters 1000] [--num-samples 512] [--methods nearest layerwise brecq brecq_qdrop]
        [--model resnet18|mobilenet_v3]
    python benchmarks/bench_digits_methods.py --settings w4a4 w2a4 \
        --methods brecq brecq_mse brecq_fisher_raw brecq_fisher_normalized   # the Fisher weighting
    python benchmarks/bench_digits_methods.py --model vit --settings w8a8 w6a6 w4a4   # the digits ViT
    python benchmarks/bench_digits_methods.py --model vit --settings w4a4 --methods brecq \
        --quant-cfg "dict(transformer=dict(unit='halves'))"                         # any quant_cfg option
"""
import argparse
import ast
import copy
import json
import time

from mmbrecq.engine.demo import DIGITS_MODELS, digits_benchmark_setup, top1_and_kl

METHODS = {
    'nearest': None,
    'layerwise': dict(granularity='layer', loss='mse'),
    'brecq': dict(),
    'brecq_qdrop': dict(input_mix='qdrop'),
    # the Fisher weighting, measured (default: the reference's (|g|+1)^2)
    'brecq_mse': dict(loss='mse'),
    'brecq_fisher_raw': dict(fisher_weight='raw'),
    'brecq_fisher_normalized': dict(fisher_weight='normalized'),
}
DEFAULT_METHODS = ['nearest', 'layerwise', 'brecq', 'brecq_qdrop']


def run(setting, method, args, cfg, float_model, calib, test_batches, fp_logits):
    import mmbrecq
    w, a = (int(x) for x in setting[1:].split('a'))
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), dict(args.quant_cfg, w_bits=w, a_bits=a))
    mmbrecq.set_quant_state(model, True, True)
    mmbrecq.calibrate_activations(model, calib.batches[:1], calib.forward, stream=args.act_stream)
    t0 = time.perf_counter()
    if METHODS[method] is not None:
        recon = dict(iters=args.iters, progress=False, seed=args.seed, **METHODS[method])
        mmbrecq.reconstruct(model, calib, recon, logger='silent')
    seconds = time.perf_counter() - t0
    top1, kl = top1_and_kl(model, test_batches, fp_logits)
    return dict(setting=setting, method=method, top1=top1, kl=kl, seconds=seconds)


def _literal_dict(text):
    """``dict(a=1)`` or ``{'a': 1}`` -> a dict (literals only, nothing is executed)."""
    node = ast.parse(text, mode='eval').body
    if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'dict' and not node.args:
        return {kw.arg: _literal_node(kw.value) for kw in node.keywords}
    value = ast.literal_eval(node)
    if not isinstance(value, dict):
        raise SystemExit(f'--quant-cfg must be a dict, got {text!r}')
    return value


def _literal_node(node):
    if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'dict' and not node.args:
        return {kw.arg: _literal_node(kw.value) for kw in node.keywords}
    return ast.literal_eval(node)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--settings', nargs='+', default=['w4a4', 'w2a4', 'w3a3', 'w2a2'])
    p.add_argument('--methods', nargs='+', default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument('--iters', type=int, default=1000)
    p.add_argument('--num-samples', type=int, default=512)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--model', default='resnet18', choices=sorted(DIGITS_MODELS),
                   help='the demo float model (slim ResNet-18, MobileNetV3-small-0.5 or a small ViT)')
    p.add_argument('--quant-cfg', default='dict()', help='extra quant_cfg keys, a Python dict literal')
    p.add_argument('--act-stream', default='auto', choices=['auto', 'float', 'quantized'],
                   help='where the activation ranges are searched (quant_cfg.calib.act_stream)')
    p.add_argument('--json', help='also write the rows to this file')
    args = p.parse_args()
    args.quant_cfg = _literal_dict(args.quant_cfg)

    import mmbrecq  # noqa: F401  (registers the plugin)
    cfg, float_model, calib, test_batches, fp_logits, fp_top1 = digits_benchmark_setup(
        args.num_samples, args.seed, model=args.model)
    print(f'{args.model} on the digits test split (360 images), calibration {calib.num_samples} train images, '
          f'{args.iters} iterations per unit, seed {args.seed}, quant_cfg extras {args.quant_cfg}')
    print(f'{"setting":8s} {"method":24s} {"top-1":>7s} {"KL(fp||q)":>10s} {"recon s":>8s}')
    print(f'{"float":8s} {"-":24s} {fp_top1:7.2f} {0:10.4f} {0:8.1f}')
    rows = [dict(setting='float', method='-', top1=fp_top1, kl=0.0, seconds=0.0)]
    for setting in args.settings:
        for method in args.methods:
            r = run(setting, method, args, cfg, float_model, calib, test_batches, fp_logits)
            rows.append(r)
            print(f'{r["setting"]:8s} {r["method"]:24s} {r["top1"]:7.2f} {r["kl"]:10.4f} {r["seconds"]:8.1f}',
                  flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
