"""Saving and loading the quantized model (fake-quant state), mmengine-compatible.

The file holds tensors and plain Python values only (the quant_cfg as plain dicts and
lists), so ``torch.load(path, weights_only=True)`` reads it, and it is written all or
nothing (a run killed while saving leaves the previous file).
"""
import os.path as osp

import torch

from mmbrecq.mixed_precision.bits import apply_saved_bits
from mmbrecq.modules import QuantConfig, quantize_model
from mmbrecq.utils import CheckpointError, atomic_save, load_checkpoint_file, to_plain
from mmbrecq.version import __version__

FORMAT = 'mmbrecq.fakequant.v1'


def save_quantized(model, path, quant_cfg, extra_meta=None):
    """Write ``{'state_dict', 'meta'}``: every quantization parameter, and the quant_cfg."""
    meta = dict(format=FORMAT, mmbrecq_version=__version__, quant_cfg=to_plain(dict(quant_cfg)))
    meta.update(to_plain(extra_meta or {}))
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else to_plain(v)
             for k, v in model.state_dict().items()}
    return atomic_save(dict(state_dict=state, meta=meta), path)


def read_quantized(path):
    """The checkpoint dict of a quantized checkpoint; a clear error when ``path`` is not one."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'quantized checkpoint {path!r} does not exist')
    ckpt = load_checkpoint_file(path, what='quantized checkpoint')
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    if not isinstance(meta, dict) or meta.get('format') != FORMAT or 'state_dict' not in ckpt:
        fmt = meta.get('format') if isinstance(meta, dict) else None
        raise CheckpointError(f'{path} is not an mmbrecq quantized checkpoint (meta.format={fmt!r}, expected '
                              f'{FORMAT!r}: the quantized.pth that tools/ptq.py writes)')
    return ckpt


def load_quantized(model, path, quant_cfg=None):
    """Swap a float ``model`` and load a quantized checkpoint into it (strict, bit-exact).

    ``quant_cfg`` defaults to the one stored in the checkpoint, so a saved model is
    rebuilt exactly as it was quantized.
    """
    ckpt = read_quantized(path)
    meta = ckpt['meta']
    qcfg = dict(quant_cfg if quant_cfg is not None else meta['quant_cfg'])
    qcfg['weight_quantizer'] = dict(qcfg.get('weight_quantizer', QuantConfig({}).cfg['weight_quantizer']))
    qcfg['weight_quantizer']['num_candidates'] = 1  # ranges come from the checkpoint: skip the search
    quantize_model(model, qcfg)
    try:
        apply_saved_bits(model, ckpt['state_dict'])  # mixed precision: per-layer weight bits as saved
        model.load_state_dict(ckpt['state_dict'], strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f'quantized checkpoint {path} does not fit the model of the config '
                              f'({" ".join(lines)[:600]}); use the config it was made with '
                              f'(meta.config={meta.get("config")!r})') from e
    return model, meta
