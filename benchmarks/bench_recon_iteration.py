"""Cost of one reconstruction iteration relative to a float forward+backward of the block.

For mmpretrain ResNet-18 blocks (random weights are fine for timing) at 224x224, batch
32, this prints ``time(one BRECQ iteration) / time(float forward + backward, weight
gradients only)`` measured in the same run. The iteration includes everything the hot
loop does: random batch gather from the cache, soft AdaRound weights, LSQ activation
quantizers, Fisher-weighted loss, rounding regulariser, Adam steps on alpha and steps.

    python benchmarks/bench_recon_iteration.py [--blocks backbone.layer1.0 backbone.layer3.0]
        [--iters 20] [--samples 64] [--device cpu]
"""
import argparse
import copy
import time

import torch


def build_resnet18():
    from mmengine.hub import get_config
    from mmpretrain.registry import MODELS
    cfg = get_config('mmpretrain::resnet/resnet18_8xb32_in1k.py')
    return MODELS.build(cfg.model).eval()


def block_input_shape(model, name, res):
    shapes = {}

    def record(module, args):
        shapes['x'] = args[0].shape

    h = model.get_submodule(name).register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 3, res, res), mode='tensor')
    h.remove()
    return tuple(shapes['x'][1:])


def timeit(fn, iters, device):
    for _ in range(3):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--blocks', nargs='+', default=['backbone.layer1.0', 'backbone.layer3.0'])
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--samples', type=int, default=64, help='cached samples per unit')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--res', type=int, default=224)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()

    import mmbrecq
    from mmbrecq.modules import fold_bn, find_units
    from mmbrecq.reconstruction import CacheBudget, recon_config
    from mmbrecq.reconstruction.optimize import UnitData, _param_groups, _run_stage
    from mmbrecq.modules.swap import set_quant_state, unit_layers
    device = torch.device(args.device)
    torch.manual_seed(0)
    float_model = build_resnet18()
    fold_bn(float_model)
    qmodel = mmbrecq.quantize_model(copy.deepcopy(build_resnet18()), dict(w_bits=4, a_bits=4))
    qmodel.to(device)
    float_model.to(device)
    units = {u.name: u for u in find_units(qmodel)}
    print(f'device: {device}, batch {args.batch_size}, {args.res}x{args.res}, {args.iters} timed iterations')
    print(f'{"block":20s} {"float f+b (ms)":>15s} {"recon iter (ms)":>16s} {"ratio":>7s}')
    for name in args.blocks:
        shape = block_input_shape(float_model, name, args.res)
        fblock = float_model.get_submodule(name)
        unit = units[name]
        with torch.no_grad():
            x = torch.randn(args.samples, *shape, device=device).relu_()
            y = fblock(x)
        budget = CacheBudget(device, device_gb=8, host_gb=16)
        caches = {}
        for key, t in (('x', x), ('y', y), ('w', torch.rand_like(y))):
            caches[key] = budget.allocate(tuple(t.shape), name=key)
            caches[key].write(0, t)
        data = UnitData([caches['x']], None, [caches['y']], [caches['w']])

        # baseline: float forward + backward of the same block, weight gradients only
        for p_ in fblock.parameters():
            p_.requires_grad_(True)
        gen = torch.Generator(device=data.index_device).manual_seed(0)

        def float_step():
            idx = torch.randint(args.samples, (args.batch_size, ), generator=gen, device=data.index_device)
            xb = caches['x'].gather(idx)
            out = fblock(xb)
            loss = out.pow(2).mean()
            loss.backward()

        t_float = timeit(float_step, args.iters, device)

        # ours: one optimisation iteration of the quantized unit
        with torch.no_grad():
            mmbrecq.calibrate_activations(qmodel, [torch.randn(2, 3, args.res, args.res, device=device)],
                                          lambda m, b: m(b, mode='tensor'))
        for p_ in qmodel.parameters():
            p_.requires_grad_(False)
        for layer in unit_layers(unit).values():
            layer.weight_quantizer.set_rounding('soft', layer.weight)
        set_quant_state(unit.module, True, True)
        cfg = recon_config(dict(iters=args.iters + 3, check_every=10**9))
        wq, aq, groups = _param_groups(unit, cfg)

        def run(n):
            cfg_n = dict(cfg, iters=n)
            _run_stage(unit, data, cfg_n, n, groups, wq, aq, True, 0, None, 'bench')

        run(3)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(args.iters)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t_recon = (time.perf_counter() - t0) / args.iters
        print(f'{name:20s} {t_float * 1e3:15.1f} {t_recon * 1e3:16.1f} {t_recon / t_float:7.2f}')


if __name__ == '__main__':
    main()
