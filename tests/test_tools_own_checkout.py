"""Each checkout's tools run that checkout's ``mmbrecq``, whichever one the shared
environment has installed (editable installs point at the checkout that last ran ``make``)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('tool', ['ptq', 'test', 'export'])
def test_tool_imports_its_own_checkout(tool, tmp_path):
    decoy = tmp_path / 'other_checkout' / 'mmbrecq'
    decoy.mkdir(parents=True)
    (decoy / '__init__.py').write_text("raise SystemExit('the other checkout was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(decoy.parent))  # as an installed other checkout would be
    out = subprocess.run([sys.executable, str(ROOT / 'tools' / f'{tool}.py'), '--help'], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'usage:' in out.stdout and '--trust-checkpoint' in out.stdout
