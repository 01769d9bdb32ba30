"""Checks of a PTQ run's inputs, made before any work: the float checkpoint (read safely,
every key matched, every value finite) and a work dir to resume (same quant_cfg, readable
state). Each failure is an :class:`~mmbrecq.utils.InputError` naming the file and the fix.
"""
import json
import os.path as osp

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import _load_checkpoint

from mmbrecq.utils import CheckpointError, InputError, load_checkpoint_file, to_plain
from mmbrecq.utils.compat import SAFE_GLOBALS

#: quant_cfg entries a resumed run may change: they do not change the quantized model
RESUME_MAY_CHANGE = ('recon.progress', 'recon.cache', 'calib.dataloader')


def _is_url(path):
    return '://' in str(path)


def _listing(keys, n=5):
    keys = list(keys)
    more = f' and {len(keys) - n} more' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def float_state_dict(path):
    """The state dict of a float checkpoint, as mmengine reads it (``state_dict`` or the
    whole dict; a ``module.`` prefix of a wrapped model removed)."""
    if _is_url(path):  # mmengine's http / open-mmlab:// loaders call torch.load (weights_only=True)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = _load_checkpoint(str(path), map_location='cpu')
    else:
        ckpt = load_checkpoint_file(path, what='float checkpoint')
    if isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict'), dict):
        ckpt = ckpt['state_dict']
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt):
        raise CheckpointError(f'float checkpoint {path!r} holds no state dict (a dict of parameter names to '
                              f'tensors, or {{"state_dict": ...}}), but a {type(ckpt).__name__}')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt.items()}


def load_float_checkpoint(model, path):
    """Load the float checkpoint ``path`` into ``model`` strictly; returns what was loaded
    (for ``summary.json``).

    mmengine's own ``load_from`` only warns about missing or unexpected keys, and a run
    would then quantize a model whose weights did not load; a NaN in the float weights
    would spread through calibration and every unit's loss. Both stop here instead.
    """
    state = float_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and isinstance(v, torch.Tensor) and isinstance(state[k], torch.Tensor)
              and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f'{len(missing)} of the model\'s {len(own)} keys missing ({_listing(missing)})' if missing else '',
                 f'{len(unexpected)} unexpected keys ({_listing(unexpected)})' if unexpected else '',
                 f'{len(shapes)} of other shape (checkpoint vs model: {_listing(shapes, 3)})' if shapes else '']
        raise CheckpointError(f'float checkpoint {path} does not fit the model of the config: '
                              + '; '.join(p for p in parts if p)
                              + '; is it the checkpoint of this architecture (float_checkpoint / --checkpoint)?')
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f'float checkpoint {path}: non-finite values (NaN or inf) in {_listing(bad)}; a float '
                         'model that is not finite cannot be calibrated or reconstructed: fix the float model')
    model.load_state_dict(state, strict=True)
    return dict(float_checkpoint=str(path), keys=len(state), all_keys_matched=True)


def read_progress(path, logger=None):
    """The JSON progress file of an interrupted run, or ``None`` when it is missing or
    unreadable (a warning then says that its evaluations are redone)."""
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            progress = json.load(f)
        if not isinstance(progress, dict) or not isinstance(progress.get('metrics', {}), dict):
            raise ValueError(f'a {type(progress).__name__} where a dict of results was expected')
        return progress
    except (ValueError, UnicodeDecodeError) as e:
        print_log(f'resume: {path} is not readable ({e}); its evaluations are redone', logger, level=30)
        return None


def _differences(old, new, prefix=''):
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            key = f'{prefix}.{k}' if prefix else str(k)
            if key in RESUME_MAY_CHANGE:
                continue
            yield from _differences(old.get(k), new.get(k), key)
    elif old != new:
        yield prefix, old, new


def plain_quant_cfg(quant_cfg):
    """``quant_cfg`` as JSON gives it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(to_plain(dict(quant_cfg)), default=str))


def check_resume(progress, progress_path, quant_cfg):
    """Refuse to resume a work dir whose run was started with another quant_cfg."""
    if not progress or 'quant_cfg' not in progress:
        return
    diffs = list(_differences(progress['quant_cfg'], plain_quant_cfg(quant_cfg)))
    if diffs:
        what = '; '.join(f'quant_cfg.{k}: {old!r} then, {new!r} now' for k, old, new in diffs[:5])
        raise InputError(f'--resume: the run in this work dir was started with another quant_cfg ({what}; '
                         f'recorded in {progress_path}); resume with the config it was started with, or start '
                         'anew in another --work-dir (or without --resume)')
