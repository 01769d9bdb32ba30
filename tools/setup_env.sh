#!/usr/bin/env bash
# One setup path for the README, CI and new users: creates (or reuses) a Python
# environment and installs the pinned OpenMMLab stack, idempotently.
#
#   MMBRECQ_VENV    where to create the virtual environment (default: ~/.cache/mmbrecq/venv)
#   MMBRECQ_PYTHON  use this interpreter instead (e.g. your own CUDA env); its torch is kept
#
# Why each pin: see issue #2 / README "Installation".
#   torch 2.9.1 + torchvision 0.24.1  mmpretrain imports torchvision; mmcv 2.1.0 builds against
#                                     torch 2.9.1 headers (2.14's need C++20)
#   setuptools>=77,<81                torch needs >=77; mmengine/mmcv import pkg_resources (<81)
#   mmcv 2.1.0 from source, with ops  mmdet 3.3.0 needs mmcv<2.2 and compiled nms/RoIAlign
# The mmcv wheel is cached under a key made of the torch version, its CUDA version and the
# Python tag, so a torch change can never pick up a binary built against another torch.
set -euo pipefail

cache_root="${MMBRECQ_CACHE:-$HOME/.cache/mmbrecq}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -n "${MMBRECQ_PYTHON:-}" ]]; then
  py="$MMBRECQ_PYTHON"
else
  venv="${MMBRECQ_VENV:-$cache_root/venv}"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating virtual environment $venv"
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
fi

pip_install() {  # quiet; drops the warnings about this machine's unused local index paths
  "$py" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither' >&2)
}
have() { "$py" - "$@" <<'PY'
import sys
from importlib import metadata
ok = True
for spec in sys.argv[1:]:
    name, _, ver = spec.partition('==')
    try:
        got = metadata.version(name)
    except metadata.PackageNotFoundError:
        ok = False
        continue
    if ver and got.split('+')[0] != ver:
        ok = False
sys.exit(0 if ok else 1)
PY
}

# 1. torch: never replaced once present (a GPU user keeps their CUDA build).
if ! have torch; then
  echo "[setup] installing torch 2.9.1 + torchvision 0.24.1 (several GB, a few minutes)"
  pip_install torch==2.9.1 torchvision==0.24.1
elif ! have torchvision; then
  echo "[setup] torch present without torchvision: install the torchvision matching your torch" >&2
  exit 1
fi

# 2. build prerequisites
if ! "$py" -c "import setuptools, sys; v = tuple(map(int, setuptools.__version__.split('.')[:2])); sys.exit(0 if (77, 0) <= v < (81, 0) else 1)" 2>/dev/null; then
  pip_install 'setuptools>=77,<81' wheel ninja
fi
have numpy || pip_install 'numpy<2.5'
have mmengine==0.10.7 || pip_install mmengine==0.10.7

# 3. mmcv with compiled ops, built once per torch build
key="$("$py" -c "import sys, torch; print(f'torch{torch.__version__}-cuda{torch.version.cuda}-py{sys.version_info[0]}{sys.version_info[1]}'.replace('+', '_'))")"
wheel_dir="$cache_root/wheels/$key"
mmcv_ok() { "$py" -c "import mmcv, mmcv.ops, torch; assert mmcv.__version__ == '2.1.0'; mmcv.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)" >/dev/null 2>&1; }
if ! mmcv_ok; then
  if ! ls "$wheel_dir"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    echo "[setup] building mmcv 2.1.0 with ops against $key (about 30 min on 2 cores, once)"
    mkdir -p "$wheel_dir"
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" -m pip wheel --disable-pip-version-check -q \
      --no-build-isolation --no-deps --no-cache-dir -w "$wheel_dir" mmcv==2.1.0 \
      2> >(grep -v 'is ignored: it is neither' >&2)
  fi
  pip_install --force-reinstall --no-deps "$wheel_dir"/mmcv-2.1.0-*.whl
  have mmcv || exit 1
  pip_install 'addict' 'packaging' 'Pillow' 'pyyaml' 'yapf' 'opencv-python'
  mmcv_ok || { echo "[setup] mmcv.ops does not work with this torch" >&2; exit 1; }
fi

# 4. the rest (pure Python), then mmbrecq itself in development mode
have mmpretrain==1.2.0 mmdet==3.3.0 || pip_install mmpretrain==1.2.0 mmdet==3.3.0
need=()
while read -r req; do
  [[ -z "$req" || "$req" == \#* ]] && continue
  have "$req" || need+=("$req")
done < <(cat "$repo_root"/requirements/tests.txt "$repo_root"/requirements/optional.txt \
             "$repo_root"/requirements/lint.txt | sed 's/[<>=].*//')
if [[ ${#need[@]} -gt 0 ]]; then
  pip_install -r "$repo_root/requirements/tests.txt" -r "$repo_root/requirements/optional.txt" \
    -r "$repo_root/requirements/lint.txt"
fi
if ! (cd / && "$py" -c "import mmbrecq.version, os, sys; sys.exit(0 if os.path.dirname(os.path.dirname(mmbrecq.version.__file__)) == sys.argv[1] else 1)" "$repo_root") 2>/dev/null; then
  pip_install --no-deps --no-build-isolation -e "$repo_root"
fi
echo "$py"
