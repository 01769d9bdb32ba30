"""Quantization error of post-LayerNorm activations on three grids: per-tensor, per-channel
(RepQ-ViT's reparameterisation, folded with a shift) and per-channel shift-free (one zero
point for every channel: the fold of Swin's ``norm1`` and of bias-free Linears).

The activations are the outputs of every ``ln1`` / ``ln2`` of the trained digits ViT on 256
training images; each quantizer is range-initialised (min-max) on all of them, and the
relative squared error ``|q(y) - y|^2 / |y|^2`` is printed per LayerNorm.

    python benchmarks/bench_post_ln_grids.py [--bits 4 6] [--num-samples 256]
"""
import argparse

import torch

from mmbrecq.engine.demo import DIGITS_MODELS, load_float_model, preprocessed_batches, tensor_forward
from mmbrecq.quantizers import ChannelReparamQuantizer, LSQQuantizer

GRIDS = ('per-tensor', 'per-channel', 'shift-free')


def _quantizer(grid, bits):
    if grid == 'per-tensor':
        return LSQQuantizer(bits=bits, init='minmax')
    q = ChannelReparamQuantizer(bits=bits, init='minmax')
    if grid == 'shift-free':
        q.set_shift_free()
    return q


@torch.no_grad()
def post_ln_outputs(num_samples, seed=0):
    """``{LayerNorm name: its outputs}`` of the digits ViT's encoder layers."""
    torch.manual_seed(seed)
    cfg, model = load_float_model(*DIGITS_MODELS['vit'])
    outs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs.setdefault(n, []).append(o.detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) and '.layers.' in n]
    for batch in preprocessed_batches(cfg, model, 'train', num_samples, 64, seed=seed):
        tensor_forward(model, batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


@torch.no_grad()
def relative_error(grid, bits, y):
    q = _quantizer(grid, bits)
    q.init_range(y)
    return float((q(y) - y).pow(2).sum() / y.pow(2).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--bits', type=int, nargs='+', default=[4, 6])
    parser.add_argument('--num-samples', type=int, default=256)
    args = parser.parse_args(argv)
    outs = post_ln_outputs(args.num_samples)
    for bits in args.bits:
        print(f'{bits}-bit: relative squared error, ' + ' / '.join(GRIDS))
        for name, y in outs.items():
            print(f'  {name:24s} ' + ' / '.join(f'{relative_error(g, bits, y):.5f}' for g in GRIDS))


if __name__ == '__main__':
    main()
