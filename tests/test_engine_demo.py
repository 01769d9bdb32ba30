"""The helpers behind the digits benchmarks and acceptance tests (no runner)."""
import os
from pathlib import Path

import pytest
import torch

from mmbrecq.engine.demo import digits_benchmark_setup, top1_and_kl

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the default config / checkpoint paths are relative to the repository


def test_benchmark_setup_is_the_float_model_on_its_splits():
    cfg, model, calib, test_batches, fp_logits, fp_top1 = digits_benchmark_setup(num_samples=64, seed=0)
    assert calib.num_samples == 64 and sum(b['inputs'].shape[0] for b in test_batches) == 360
    assert fp_top1 == pytest.approx(99.44, abs=0.01)  # the committed checkpoint's test accuracy
    assert all(t.shape[1] == 10 for t in fp_logits)
    top1, kl = top1_and_kl(model, test_batches, fp_logits)
    assert top1 == fp_top1 and kl == pytest.approx(0, abs=1e-6)
    # seeded: the same calibration images again
    again = digits_benchmark_setup(num_samples=64, seed=0)[2]
    assert all(torch.equal(a['inputs'], b['inputs']) for a, b in zip(calib.batches, again.batches))
    assert os.path.basename(cfg.filename) == 'digits_resnet_float.py'
