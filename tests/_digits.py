"""What the digits acceptance tests share: a demo model with its calibration and test
batches, and the three methods (nearest / layer-wise / BRECQ) at a short schedule."""
import copy
import os

import torch

import mmbrecq
from mmbrecq.engine.demo import DIGITS_MODELS, load_float_model, preprocessed_batches, tensor_forward, top1_and_kl
from mmbrecq.reconstruction import CalibrationSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = (('nearest', None), ('layerwise', dict(granularity='layer', loss='mse')), ('brecq', dict()))


def digits_setup(model_name):
    """``(float model, calibration set (256 train images), test batches, float test logits,
    float top-1)`` of a demo model (a key of ``DIGITS_MODELS``)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        torch.manual_seed(0)
        cfg, model = load_float_model(*DIGITS_MODELS[model_name])
        calib = CalibrationSet(preprocessed_batches(cfg, model, 'train', 256, 64, seed=0), tensor_forward)
        test = preprocessed_batches(cfg, model, 'test', None, 120)
    finally:
        os.chdir(cwd)
    with torch.no_grad():
        ref = [tensor_forward(model, b) for b in test]
    fp_top1, _ = top1_and_kl(model, test, ref)
    return model, calib, test, ref, fp_top1


def quantized(model, calib, w, a, recon=None, iters=300):
    """``model`` at WwAa, calibrated, reconstructed with ``recon`` (``iters`` per unit) unless ``None``."""
    q = mmbrecq.quantize_model(copy.deepcopy(model), dict(w_bits=w, a_bits=a))
    mmbrecq.set_quant_state(q, True, True)
    mmbrecq.calibrate_activations(q, calib.batches[:1], calib.forward)
    if recon is not None:
        mmbrecq.reconstruct(q, calib, dict(iters=iters, progress=False, seed=0, **recon), logger='silent')
    return q


def method_scores(setup, w, a, iters=300):
    """``{method: (top-1, KL)}`` of the three methods at WwAa, ``iters`` per unit (printed for the log)."""
    model, calib, test, ref, fp_top1 = setup
    scores = {name: top1_and_kl(quantized(model, calib, w, a, recon, iters), test, ref) for name, recon in METHODS}
    print(f'W{w}A{a} float {fp_top1:.2f}', {k: (round(t, 2), round(kl, 5)) for k, (t, kl) in scores.items()})
    return scores
