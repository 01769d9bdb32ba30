"""The command-line tools loaded in-process from ``tools/`` (shared by the tool tests)."""
import functools
import importlib.util
import itertools
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count()


@functools.lru_cache(maxsize=None)
def load_tool(name):
    """``tools/<name>.py`` as a module (loaded once per test session)."""
    spec = importlib.util.spec_from_file_location(f'_mmbrecq_tool_{name}', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unique_name(tag):
    """An mmengine ``experiment_name`` no other in-process run uses: the Runner's logger,
    message hub and visualizer are instances looked up by that name (see test_tools_ptq.py)."""
    return f'{tag}_{os.getpid()}_{next(_counter)}_{time.time_ns()}'
