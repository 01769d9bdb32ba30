"""benchmarks/bench_ablations.py without running it: every variant is a valid quant_cfg and
the table reports ties within the seed spread."""
import sys
from pathlib import Path

import pytest

from mmbrecq.config import validate_quant_cfg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import bench_ablations  # noqa: E402


@pytest.mark.parametrize('name, spec', list(bench_ablations.variants('conv1', 'layer1.0.conv1', 'fc', 2).items()))
def test_every_variant_is_a_valid_quant_cfg(name, spec):
    quant_extra, recon_extra, init_images = spec
    merged = validate_quant_cfg(dict(quant_extra, w_bits=2, a_bits=2, recon=recon_extra))
    assert merged['w_bits'] == 2 and init_images in (64, None, 'other'), name


def test_table_verdicts_follow_the_seed_spread():
    rows = [dict(setting='w2a2', variant=v, seed=s, top1=t, kl=k) for v, s, t, k in [
        ('default', 0, 95.0, 0.10), ('default', 1, 96.0, 0.12),
        ('mse', 0, 95.2, 0.20), ('mse', 1, 95.6, 0.22),        # top-1 within the spread, KL worse
        ('qdrop', 0, 97.5, 0.05), ('qdrop', 1, 97.7, 0.05)]]   # better in both
    lines = bench_ablations.table(rows, ['w2a2'], ['default', 'mse', 'qdrop']).splitlines()
    assert lines[2].startswith('| default | 95.50 ± 0.50 | 0.1100 ± 0.0100 |')
    assert 'tie' in lines[3].split('|')[2] and 'worse' in lines[3].split('|')[3]
    assert 'better' in lines[4].split('|')[2] and 'better' in lines[4].split('|')[3]
