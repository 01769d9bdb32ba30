"""Saving and loading the quantized model (fake-quant state), mmengine-compatible."""
import os.path as osp

import torch

from mmbrecq.mixed_precision.bits import apply_saved_bits
from mmbrecq.modules import QuantConfig, quantize_model
from mmbrecq.utils import load_checkpoint_file
from mmbrecq.version import __version__

FORMAT = 'mmbrecq.fakequant.v1'


def save_quantized(model, path, quant_cfg, extra_meta=None):
    """Write ``{'state_dict', 'meta'}``: every quantization parameter, and the quant_cfg."""
    meta = dict(format=FORMAT, mmbrecq_version=__version__, quant_cfg=dict(quant_cfg))
    meta.update(extra_meta or {})
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    torch.save(dict(state_dict=state, meta=meta), path)
    return path


def load_quantized(model, path, quant_cfg=None):
    """Swap a float ``model`` and load a quantized checkpoint into it (strict, bit-exact).

    ``quant_cfg`` defaults to the one stored in the checkpoint, so a saved model is
    rebuilt exactly as it was quantized.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'quantized checkpoint {path!r} does not exist')
    ckpt = load_checkpoint_file(path)
    meta = ckpt.get('meta', {})
    if meta.get('format') != FORMAT:
        raise ValueError(f'{path} is not an mmbrecq quantized checkpoint (meta.format={meta.get("format")!r})')
    qcfg = dict(quant_cfg if quant_cfg is not None else meta['quant_cfg'])
    qcfg['weight_quantizer'] = dict(qcfg.get('weight_quantizer', QuantConfig({}).cfg['weight_quantizer']))
    qcfg['weight_quantizer']['num_candidates'] = 1  # ranges come from the checkpoint: skip the search
    quantize_model(model, qcfg)
    apply_saved_bits(model, ckpt['state_dict'])  # mixed precision: per-layer weight bits as saved
    model.load_state_dict(ckpt['state_dict'], strict=True)
    return model, meta
