"""The helpers behind the digits benchmarks and acceptance tests (no runner)."""
import os
from pathlib import Path

import pytest
import torch

from mmbrecq.engine.demo import DIGITS_MODELS, digits_benchmark_setup, top1_and_kl

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


@pytest.mark.parametrize('name', sorted(DIGITS_MODELS))
def test_every_demo_model_loads_its_committed_checkpoint(name):
    """Each demo model's config builds and its committed checkpoint loads strictly and
    classifies the digits test split (the benchmarks start from these)."""
    _, model, _, test_batches, fp_logits, fp_top1 = digits_benchmark_setup(num_samples=32, seed=0, model=name)
    assert fp_top1 > 97, name
    assert sum(b['inputs'].shape[0] for b in test_batches) == 360


def test_narrow_resnet_is_the_demo_resnet_at_half_width():
    from mmbrecq.engine.demo import load_float_model
    _, narrow = load_float_model(*DIGITS_MODELS['resnet18_narrow'])
    _, wide = load_float_model(*DIGITS_MODELS['resnet18'])
    shapes = {k: v.shape for k, v in narrow.state_dict().items()}
    assert set(shapes) == set(wide.state_dict())  # same layout: the reference mapping holds for both
    assert shapes['head.fc.weight'] == (10, 64) and wide.state_dict()['head.fc.weight'].shape == (10, 128)
