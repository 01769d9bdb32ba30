"""Cost of one reconstruction iteration relative to a float forward+backward of the block.

For mmpretrain ResNet-18 blocks (random weights are fine for timing) at 224x224, batch
32, this prints ``time(one BRECQ iteration) / time(float forward + backward, weight
gradients only)`` measured in the same run. The iteration includes everything the hot
loop does: random batch gather from the cache, soft AdaRound weights, LSQ activation
quantizers, Fisher-weighted loss, rounding regulariser, Adam steps on alpha and steps.

    python benchmarks/bench_recon_iteration.py [--blocks backbone.layer1.0 backbone.layer3.0]
        [--iters 20] [--samples 64] [--device cpu]
    python benchmarks/bench_recon_iteration.py --model deit-s   # one DeiT-S encoder layer, 197 tokens

For ``--model deit-s`` the units are those of one ``TransformerEncoderLayer`` of DeiT-S (embed
384, 6 heads, 197 tokens at 224x224) under ``quant_cfg.transformer.unit`` (default: its
attention and MLP halves; then the two together, i.e. the whole layer's step, against the
float forward+backward of both halves (weight gradients only), and against the float
forward+backward of the whole layer (every parameter's gradient, LayerNorms included: the
layer's float training step, which also computes the gradients of the halves' inputs);
``--unit layer``: the layer as one unit, against that same baseline):
the Linears in soft AdaRound, LSQ on their inputs and on Q, K, V, the log-sqrt2 quantizer on
the softmax output. ``--learn-entry-step yes|no`` overrides ``transformer.learn_entry_step``,
``--entry-step-stride K`` ``transformer.entry_step_stride``; ``--profile N`` adds the N
costliest operators of each step and its page faults.
"""
import argparse
import copy
import time

import torch

#: --model -> (mmpretrain config, default blocks)
MODELS = {
    'resnet18': ('resnet/resnet18_8xb32_in1k.py', ['backbone.layer1.0', 'backbone.layer3.0']),
    'deit-s': ('deit/deit-small_4xb256_in1k.py', ['backbone.layers.0']),
}
#: transformer units of DeiT-S's first layer under quant_cfg.transformer.unit='halves'
HALVES = ['backbone.layers.0.attn', 'backbone.layers.0.ffn.layers']
HALVES_LAYER = 'backbone.layers.0'


def build_model(name):
    from mmengine.hub import get_config
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
    cfg = get_config(f'mmpretrain::{MODELS[name][0]}')
    return MMPRETRAIN_MODELS.build(cfg.model).eval()


def block_input_shape(model, name, res):
    shapes = {}

    def record(module, args):
        shapes['x'] = args[0].shape

    h = model.get_submodule(name).register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 3, res, res), mode='tensor')
    h.remove()
    return tuple(shapes['x'][1:])


def seconds_per_iter(run, iters, device):
    """Wall time of ``run(iters)`` divided by ``iters`` (synchronised on CUDA)."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(iters)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def float_step_runner(block, batch_of, args, index_device):
    """``steps(n)``: ``n`` float forward+backward passes of ``block`` on random batches
    ``batch_of(indices)`` of ``args.samples`` cached inputs; every parameter of the block gets
    its gradient (the input none)."""
    for p_ in block.parameters():
        p_.requires_grad_(True)
    gen = torch.Generator(device=index_device).manual_seed(0)

    def steps(n):
        for _ in range(n):
            idx = torch.randint(args.samples, (args.batch_size, ), generator=gen, device=index_device)
            block(batch_of(idx)).pow(2).mean().backward()
    return steps


def float_layer_step(float_model, name, args, device):
    """Seconds of one float forward+backward of the whole layer ``name`` (every parameter,
    LayerNorms included, gets its gradient, as in training; best of ``args.rounds``): the
    layer's own float step, which computes the gradients of the halves' inputs that the
    halves' baselines (weight gradients only) leave out."""
    x = torch.randn(args.samples, *block_input_shape(float_model, name, args.res), device=device)
    steps = float_step_runner(float_model.get_submodule(name), x.__getitem__, args, device)
    steps(3)
    return min(seconds_per_iter(steps, args.iters, device) for _ in range(args.rounds))


def profile_steps(steps, iters, top):
    """The ``top`` operators by self time of each step function, and the minor page faults
    per step (a fresh large buffer costs one fault per 4 KiB page on first touch)."""
    import resource

    from torch.profiler import ProfilerActivity, profile
    for label, fn in steps.items():
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn(iters)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / iters
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(iters)
        print(f'  -- {label}: {faults:.0f} minor page faults per step')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=top))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet18', choices=sorted(MODELS))
    p.add_argument('--blocks', nargs='+', default=None, help='unit names (default: per model)')
    p.add_argument('--unit', default=None, choices=['layer', 'halves'],
                   help='transformers: quant_cfg.transformer.unit (default: its default)')
    p.add_argument('--learn-entry-step', default=None, choices=['yes', 'no'],
                   help='transformers: quant_cfg.transformer.learn_entry_step (default: its default)')
    p.add_argument('--entry-step-stride', type=int, default=None,
                   help='transformers: quant_cfg.transformer.entry_step_stride (default: its default)')
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--samples', type=int, default=64, help='cached samples per unit')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--res', type=int, default=224)
    p.add_argument('--rounds', type=int, default=10,
                   help='alternating rounds of baseline and ours; the minimum of each is kept, which '
                        'filters out interference from other processes')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help='also print the N operators with the most self time in each step (torch.profiler)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import mmbrecq
    from mmbrecq.config import DEFAULTS, recon_config
    from mmbrecq.modules import fold_bn, set_quant_state
    from mmbrecq.reconstruction import (
        CacheBudget,
        CalibrationSet,
        UnitData,
        entry_quantizer,
        find_units,
        probe_units,
        unit_layers,
    )
    from mmbrecq.reconstruction.optimize import _param_groups, _run_stage, prequantized_input, step_quantizers
    device = torch.device(args.device)
    torch.manual_seed(0)
    float_model = build_model(args.model)
    fold_bn(float_model)
    transformer = dict(unit=args.unit or DEFAULTS['transformer']['unit'])
    if args.learn_entry_step is not None:
        transformer['learn_entry_step'] = args.learn_entry_step == 'yes'
    if args.entry_step_stride is not None:
        transformer['entry_step_stride'] = args.entry_step_stride
    default_blocks = HALVES if args.model == 'deit-s' and transformer['unit'] == 'halves' else MODELS[args.model][1]
    args.blocks = args.blocks or default_blocks
    qcfg = dict(w_bits=4, a_bits=4, transformer=transformer)
    qmodel = mmbrecq.quantize_model(copy.deepcopy(build_model(args.model)), qcfg)
    qmodel.to(device)
    float_model.to(device)
    set_quant_state(qmodel, True, True)
    mmbrecq.calibrate_activations(qmodel, [torch.randn(2, 3, args.res, args.res, device=device)],
                                  lambda m, b: m(b, mode='tensor'))
    units = {u.name: u for u in find_units(qmodel)}
    probe = CalibrationSet([torch.randn(1, 3, args.res, args.res, device=device)], lambda m, b: m(b, mode='tensor'))
    order_units, traces = probe_units(qmodel, list(units.values()), probe)
    order = [u.name for u in order_units]
    print(f'{args.model} on device: {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, '
          f'{args.res}x{args.res}, best of {args.rounds} rounds of {args.iters} iterations'
          + (f', transformer {mmbrecq.QuantConfig(qcfg)["transformer"]}' if args.model == 'deit-s' else ''))
    print(f'{"block":20s} {"float f+b (ms)":>15s} {"recon iter (ms)":>16s} {"ratio":>7s}')
    totals = [0.0, 0.0]
    for name in args.blocks:
        shape = block_input_shape(float_model, name, args.res)
        fblock = float_model.get_submodule(name)
        unit = units[name]
        with torch.no_grad():
            x = torch.randn(args.samples, *shape, device=device)
            if args.model.startswith('resnet'):
                x.relu_()  # a ResNet block reads a ReLU output
            y = fblock(x)
        budget = CacheBudget(device, device_gb=8, host_gb=16)
        caches = {}
        for key, t in (('x', x), ('y', y), ('w', torch.rand_like(y))):
            caches[key] = budget.allocate(tuple(t.shape), name=key)
            caches[key].write(0, t)
        data = UnitData([caches['x']], None, [caches['y']], [caches['w']])

        # baseline: float forward + backward of the same block, weight gradients only
        float_steps = float_step_runner(fblock, caches['x'].gather, args, data.index_device)

        # ours: one optimisation iteration of the quantized unit
        for p_ in qmodel.parameters():
            p_.requires_grad_(False)
        set_quant_state(qmodel, False, False)
        for layer in unit_layers(unit).values():
            layer.weight_quantizer.set_rounding('soft', layer.weight)
        set_quant_state(unit.module, True, True)
        cfg = recon_config(dict(iters=args.iters + 3, check_every=10**9))
        # as in a real run: a chained block's input step was learned by the previous block,
        # and this block learns the next block's input step on its output
        i = order.index(name)
        out_q = entry_quantizer(order_units[i + 1]) if i + 1 < len(order) and traces[order[i + 1]].chained else None
        if out_q is not None:
            out_q.enabled = True
        aq = step_quantizers(unit, out_q, input_learned=traces[name].chained)
        wq, aq, groups = _param_groups(unit, cfg, aq)
        if args.model == 'deit-s':  # no block input quantizer: the first Linear quantizes the unit input
            first = next(m for m in unit.module.modules() if isinstance(m, torch.nn.Linear))
            print(f'  {name}: first Linear\'s input step learned here: {any(q is first.input_quantizer for q in aq)}')
        else:
            print(f'  {name}: input step learned here: {not traces[name].chained}, '
                  f'learns the next block\'s input step: {out_q is not None}')

        def run(n):
            cfg_n = dict(cfg, iters=n)
            _run_stage(unit, data, cfg_n, n, groups, wq, aq, True, 0, None, 'bench', out_q)

        # a chained block's frozen input quantizer is applied to its cache once, as in a run
        frozen = entry_quantizer(unit) if traces[name].chained else None
        with prequantized_input(unit, data, frozen, 'quant'):
            float_steps(3)
            run(3)
            t_float, t_recon = float('inf'), float('inf')
            for _ in range(args.rounds):
                t_float = min(t_float, seconds_per_iter(float_steps, args.iters, device))
                t_recon = min(t_recon, seconds_per_iter(run, args.iters, device))
            if args.profile:
                profile_steps(dict(float=float_steps, recon=run), args.iters, args.profile)
        print(f'{name:20s} {t_float * 1e3:15.1f} {t_recon * 1e3:16.1f} {t_recon / t_float:7.2f}', flush=True)
        totals = [totals[0] + t_float, totals[1] + t_recon]
    if args.blocks == HALVES:  # the whole layer's step: both halves
        t_float, t_recon = totals
        print(f'{"layer (both halves)":20s} {t_float * 1e3:15.1f} {t_recon * 1e3:16.1f} {t_recon / t_float:7.2f}')
        t_layer = float_layer_step(float_model, HALVES_LAYER, args, device)
        print(f'{"layer vs layer f+b":20s} {t_layer * 1e3:15.1f} {t_recon * 1e3:16.1f} {t_recon / t_layer:7.2f}')


if __name__ == '__main__':
    main()
