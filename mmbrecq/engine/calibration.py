"""The calibration set of a PTQ run, built from the config's own data pipeline."""
import copy

import torch
from mmengine.dataset import DefaultSampler
from mmengine.runner import set_random_seed

from mmbrecq.reconstruction import CalibrationSet

DEFAULT_CALIB = dict(num_samples=1024, batch_size=32, split='train', dataloader=None, seed=0)


def calib_config(cfg):
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_CALIB))
    if unknown:
        raise ValueError(f'unknown key(s) in quant_cfg.calib: {unknown}; valid: {sorted(DEFAULT_CALIB)}')
    merged = dict(DEFAULT_CALIB, **cfg)
    if merged['split'] not in ('train', 'val', 'test'):
        raise ValueError(f"quant_cfg.calib.split={merged['split']!r}: expected 'train', 'val' or 'test'")
    for key in ('num_samples', 'batch_size'):
        if not isinstance(merged[key], int) or merged[key] < 1:
            raise ValueError(f'quant_cfg.calib.{key} must be a positive integer, got {merged[key]!r}')
    return merged


def tensor_forward(model, batch):
    """Run a preprocessed mmengine batch in ``tensor`` mode (raw logits / head maps)."""
    return model(batch['inputs'], batch['data_samples'], mode='tensor')


def build_calibration_set(runner, model, calib_cfg) -> CalibrationSet:
    """``num_samples`` images drawn (seeded) from the ``split`` dataloader of the config.

    The paper calibrates on training images *with* the training augmentation; that is
    the default. Batches go through the model's ``data_preprocessor`` once, here, so
    reconstruction never pays for decoding or normalisation again.
    """
    c = calib_config(calib_cfg)
    if c['dataloader'] is not None:
        loader_cfg = copy.deepcopy(c['dataloader'])
    else:
        key = f"{c['split']}_dataloader"
        if runner.cfg.get(key) is None:
            raise ValueError(f'quant_cfg.calib.split={c["split"]!r} needs `{key}` in the config')
        loader_cfg = copy.deepcopy(runner.cfg[key])
    loader_cfg['batch_size'] = c['batch_size']
    loader_cfg['sampler'] = dict(type=DefaultSampler, shuffle=True, seed=c['seed'])
    loader_cfg.pop('batch_sampler', None)
    loader_cfg['persistent_workers'] = False
    set_random_seed(c['seed'])  # augmentation draws from numpy/random: the same images every run
    loader = runner.build_dataloader(loader_cfg, seed=c['seed'])
    batches, taken = [], 0
    with torch.no_grad():
        for batch in loader:
            data = model.data_preprocessor(batch, training=False)
            n = min(c['batch_size'], c['num_samples'] - taken)
            if n < data['inputs'].shape[0]:
                data = dict(inputs=data['inputs'][:n], data_samples=data['data_samples'][:n])
            batches.append(data)
            taken += n
            if taken >= c['num_samples']:
                break
    if taken < c['num_samples']:
        raise ValueError(f"quant_cfg.calib.num_samples={c['num_samples']} but the {c['split']} set "
                         f'has only {taken} samples')
    return CalibrationSet(batches, tensor_forward)


def without_training(cfg):
    """``cfg`` for a runner that never trains or validates (PTQ, evaluation of a quantized model).

    mmengine's Runner wants train dataloader, train loop and optimiser all set or all unset;
    PTQ reads its calibration loader from ``quant_cfg.calib`` instead.
    """
    for key in ('train_cfg', 'optim_wrapper', 'param_scheduler', 'val_cfg'):
        cfg.pop(key, None)
    cfg.train_dataloader, cfg.val_dataloader, cfg.val_evaluator = None, None, None
    return cfg
