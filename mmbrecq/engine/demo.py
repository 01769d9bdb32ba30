"""Helpers for scripts and tests that use the API without a runner (the digits demo model).

They load a float model from its config and checkpoint, turn a split of its dataset into
preprocessed batches, and score a model against float logits (top-1 and the mean
KL(float || quantized), which still ranks methods when accuracy saturates).
"""
import copy

import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import Runner, load_checkpoint, set_random_seed
from mmpretrain.registry import MODELS

from mmbrecq.reconstruction import CalibrationSet

from .calibration import tensor_forward

DIGITS_CONFIG = 'configs/_base_/digits_resnet_float.py'
DIGITS_CHECKPOINT = 'checkpoints/digits_resnet18_float.pth'
#: the demo's float models: name -> (config, checkpoint), relative to the repository root
DIGITS_MODELS = dict(
    resnet18=(DIGITS_CONFIG, DIGITS_CHECKPOINT),
    mobilenet_v3=('configs/_base_/digits_mobilenet_v3_float.py', 'checkpoints/digits_mobilenet_v3_float.pth'),
    vit=('configs/_base_/digits_vit_float.py', 'checkpoints/digits_vit_float.pth'),
    resnet18_narrow=('configs/_base_/digits_resnet18_narrow_float.py', 'checkpoints/digits_resnet18_narrow_float.pth'),
)


def _config_scope(cfg):
    """The config's registry scope, whatever scope an earlier runner in this process left
    current (mmengine keeps the last Runner's ``default_scope`` as a global)."""
    return DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmpretrain'))


def load_float_model(config=DIGITS_CONFIG, checkpoint=DIGITS_CHECKPOINT):
    """``(cfg, model)``: an mmpretrain classifier with its float weights, in eval mode."""
    cfg = Config.fromfile(config)
    with _config_scope(cfg):
        model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
    return cfg, model.eval()


def preprocessed_batches(cfg, model, split, num_samples=None, batch_size=64, seed=0):
    """Batches of ``cfg.<split>_dataloader`` after the model's data preprocessor.

    The train split is shuffled with ``seed`` and keeps its training augmentation (the
    paper's calibration setting); ``num_samples=None`` takes the whole split.
    """
    set_random_seed(seed)  # the augmentation draws from numpy/random: same images every run
    loader_cfg = copy.deepcopy(cfg[f'{split}_dataloader'])
    loader_cfg.update(batch_size=batch_size, num_workers=0, persistent_workers=False)
    loader_cfg['sampler'] = dict(type='DefaultSampler', shuffle=split == 'train', seed=seed)
    out, n = [], 0
    with _config_scope(cfg):
        loader = Runner.build_dataloader(loader_cfg, seed=seed)
    with torch.no_grad():
        for b in loader:
            out.append(model.data_preprocessor(b, training=False))
            n += out[-1]['inputs'].shape[0]
            if num_samples and n >= num_samples:
                break
    return out


@torch.no_grad()
def top1_and_kl(model, batches, ref_logits):
    """Top-1 (%) against the labels and mean KL(softmax(ref) || softmax(model)) per sample."""
    correct, total, kl = 0, 0, 0.0
    for b, ref in zip(batches, ref_logits):
        logits = tensor_forward(model, b)
        labels = torch.cat([s.gt_label for s in b['data_samples']])
        correct += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
        kl += float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(ref, 1), log_target=True, reduction='sum'))
    return 100.0 * correct / total, kl / total


def digits_benchmark_setup(num_samples=512, seed=0, calib_batch=64, test_batch=120, model='resnet18'):
    """What the digits benchmarks start from: ``(cfg, float model, calibration set, test
    batches, float test logits, float top-1)``; calibration from the augmented train split.
    ``model``: a key of :data:`DIGITS_MODELS`."""
    if model not in DIGITS_MODELS:
        raise ValueError(f'unknown digits demo model {model!r}; choose from {sorted(DIGITS_MODELS)}')
    torch.manual_seed(seed)
    cfg, float_model = load_float_model(*DIGITS_MODELS[model])
    calib = CalibrationSet(preprocessed_batches(cfg, float_model, 'train', num_samples, calib_batch, seed),
                           tensor_forward)
    test_batches = preprocessed_batches(cfg, float_model, 'test', None, test_batch)
    with torch.no_grad():
        fp_logits = [tensor_forward(float_model, b) for b in test_batches]
    fp_top1, _ = top1_and_kl(float_model, test_batches, fp_logits)
    return cfg, float_model, calib, test_batches, fp_logits, fp_top1
