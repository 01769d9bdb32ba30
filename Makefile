# One setup path for README, CI and users. `make demo` and `make test` install what they
# need first (idempotent: a second run installs nothing).
#   MMBRECQ_PYTHON=/path/to/python  use your own environment (e.g. CUDA torch); kept as is
#   MMBRECQ_VENV=/path              where the virtual environment goes (default ~/.cache/mmbrecq/venv)
MMBRECQ_VENV ?= $(HOME)/.cache/mmbrecq/venv
PY := $(if $(MMBRECQ_PYTHON),$(MMBRECQ_PYTHON),$(MMBRECQ_VENV)/bin/python)
export MMBRECQ_VENV

.PHONY: setup demo test test-all lint

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" tests

# style + import order (ruff) and the package's layers (import-linter, contract in pyproject.toml)
lint: setup
	$(PY) -m ruff check mmbrecq tests tools benchmarks configs
	$(PY) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
