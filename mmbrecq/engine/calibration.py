"""The calibration set of a PTQ run, built from the config's own data pipeline."""
import copy

import torch
from mmengine.dataset import DefaultSampler
from mmengine.runner import set_random_seed

from mmbrecq.config import calib_config
from mmbrecq.reconstruction import CalibrationSet
from mmbrecq.utils import InputError
from mmbrecq.utils.dist import global_max, read_global_stream, shard_batch

from .detection import attach_proposals, detection_forward, is_detector, is_two_stage


def pad_batches(batches, pad_to='max', pad_value=0.):
    """Pad every batch's images (bottom/right, like mmdet's preprocessor) to one size.

    Reconstruction caches stack all calibration samples, so they must share one shape;
    detection pipelines keep the aspect ratio and give batches of different sizes.
    ``pad_to='max'`` pads to the largest calibration image; ``(H, W)`` to a fixed size.
    """
    if pad_to is None:
        return batches
    sizes = [tuple(b['inputs'].shape[-2:]) for b in batches]
    if pad_to == 'max':
        target = global_max((max(h for h, _ in sizes), max(w for _, w in sizes)))  # over the ranks' shards
    else:
        target = tuple(pad_to)
        too_big = [s for s in sizes if s[0] > target[0] or s[1] > target[1]]
        if too_big:
            raise ValueError(f'quant_cfg.calib.pad_to={target}: calibration batches of size {too_big[0]} do '
                             'not fit; use a larger size or \'max\'')
    for b in batches:
        h, w = b['inputs'].shape[-2:]
        if (h, w) == target:
            continue
        b['inputs'] = torch.nn.functional.pad(b['inputs'], (0, target[1] - w, 0, target[0] - h), value=pad_value)
        for s in b['data_samples'] or []:
            if hasattr(s, 'set_metainfo') and 'batch_input_shape' in s.metainfo:
                s.set_metainfo(dict(batch_input_shape=target, pad_shape=target))
    return batches


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
    loader_cfg = copy.deepcopy(calib_dataloader_cfg(runner.cfg, c))
    loader_cfg['batch_size'] = c['batch_size']
    loader_cfg['sampler'] = dict(type=DefaultSampler, shuffle=True, seed=c['seed'])
    loader_cfg.pop('batch_sampler', None)
    loader_cfg['persistent_workers'] = False
    set_random_seed(c['seed'])  # augmentation draws from numpy/random: the same images every run
    loader = runner.build_dataloader(read_global_stream(loader_cfg, c['seed']), seed=c['seed'])
    available = len(loader.dataset)
    if c['num_samples'] > available:
        raise InputError(f"quant_cfg.calib.num_samples={c['num_samples']} but the {c['split']} set has only "
                         f'{available} samples; use at most {available}')
    batches, taken = [], 0
    with torch.no_grad():
        for batch in loader:
            data = model.data_preprocessor(batch, training=False)
            n = min(data['inputs'].shape[0], c['num_samples'] - taken)  # a short last batch counts as it is
            if n < data['inputs'].shape[0]:
                data = dict(inputs=data['inputs'][:n], data_samples=data['data_samples'][:n])
            data = shard_batch(data, taken, n)  # several processes: this rank's samples (i -> rank i % W)
            if data is not None:
                batches.append(data)
            taken += n
            if taken >= c['num_samples']:
                break
    if taken < c['num_samples']:  # the loader dropped some (drop_last) or the set is shorter than its length
        raise InputError(f"quant_cfg.calib.num_samples={c['num_samples']} but the {c['split']} dataloader "
                         f'gives only {taken} samples; use at most {taken}')
    pad_batches(batches, c['pad_to'], float(getattr(model.data_preprocessor, 'pad_value', 0)))
    if not is_detector(model):
        return CalibrationSet(batches, tensor_forward)
    if is_two_stage(model):
        attach_proposals(model, batches, c['num_proposals'])
    return CalibrationSet(batches, detection_forward, task_loss=dict(type='DetectionDivergence'))


def calib_dataloader_cfg(cfg, calib):
    """The dataloader config the calibration set is drawn from: ``quant_cfg.calib.dataloader``,
    else the config's ``<split>_dataloader``."""
    if calib['dataloader'] is not None:
        return calib['dataloader']
    key = f"{calib['split']}_dataloader"
    if cfg.get(key) is None:
        raise ValueError(f"quant_cfg.calib.split={calib['split']!r} needs `{key}` in the config")
    return cfg[key]
