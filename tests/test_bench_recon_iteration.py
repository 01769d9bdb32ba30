"""benchmarks/bench_recon_iteration.py's float baselines on a tiny mmpretrain ViT (no timing
asserted): the whole layer's float step gives every parameter of the layer its gradient,
LayerNorms included, as a float training step does."""
import sys
from argparse import Namespace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import bench_recon_iteration  # noqa: E402


def _tiny_vit():
    from mmpretrain.registry import MODELS
    torch.manual_seed(0)
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='VisionTransformer', img_size=32, patch_size=8,
                      arch=dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64)),
        head=dict(type='VisionTransformerClsHead', num_classes=3, in_channels=32))).eval()


def test_float_layer_step_trains_every_parameter_of_the_layer():
    model = _tiny_vit()
    args = Namespace(samples=4, batch_size=2, res=32, iters=1, rounds=1)
    seconds = bench_recon_iteration.float_layer_step(model, 'backbone.layers.0', args, torch.device('cpu'))
    layer = model.backbone.layers[0]
    assert seconds > 0
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing  # ln1 / ln2 weights too: their gradients need the Linears' data gradients
    assert all(p.grad is None for p in model.backbone.layers[1].parameters())  # only that layer


def test_float_step_runner_draws_batches_of_the_cache():
    block = torch.nn.Linear(3, 2)
    cache = torch.arange(15.).view(5, 3)
    seen = []
    steps = bench_recon_iteration.float_step_runner(
        block, lambda idx: seen.append(idx) or cache[idx], Namespace(samples=5, batch_size=4), torch.device('cpu'))
    steps(3)
    assert [len(i) for i in seen] == [4, 4, 4] and all(int(i.max()) < 5 for i in seen)
    assert block.weight.grad is not None and block.bias.grad is not None
