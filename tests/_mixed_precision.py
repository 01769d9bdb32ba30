"""The real digits demo model (float checkpoint in the repository) and calibration batches,
shared by the mixed-precision tests. Min-max weight ranges: the Lp search is covered by
the quantizer tests and too slow for many re-grids on 2 CPU cores."""
import copy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))
_CACHE = {}


def digits():
    """``(float model, CalibrationSet of 64 train images)``, loaded once per session."""
    if not _CACHE:
        import mmbrecq  # noqa: F401
        from mmbrecq.engine.demo import load_float_model, preprocessed_batches, tensor_forward
        from mmbrecq.reconstruction import CalibrationSet
        cfg, model = load_float_model(str(ROOT / 'configs/_base_/digits_resnet_float.py'),
                                      str(ROOT / 'checkpoints/digits_resnet18_float.pth'))
        batches = preprocessed_batches(cfg, model, 'train', 64, 32, 0)
        _CACHE.update(cfg=cfg, model=model, calib=CalibrationSet(batches, tensor_forward))
    return _CACHE['model'], _CACHE['calib']


def quantized_digits(mp=None, w_bits=3, a_bits=4, **extra):
    """A fresh quantized copy of the digits model (activations calibrated) and its quant_cfg."""
    import mmbrecq
    float_model, calib = digits()
    qcfg = dict(w_bits=w_bits, a_bits=a_bits, **FAST, **extra)
    if mp is not None:
        qcfg['mixed_precision'] = mp
    model = mmbrecq.quantize_model(copy.deepcopy(float_model), qcfg)
    mmbrecq.set_quant_state(model, True, True)
    mmbrecq.calibrate_activations(model, calib.batches[:1], calib.forward)
    return model, qcfg, calib


def logits(model, calib):
    with torch.no_grad():
        return torch.cat([calib.forward(model, b) for b in calib.batches])
