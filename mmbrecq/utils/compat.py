"""Every shim between the pinned OpenMMLab stack and torch 2.9, in one place.

Each shim says which upstream behaviour it fixes and is covered by
``tests/test_utils_compat.py``, which fails without it. ``apply()`` is idempotent and
runs on ``import mmbrecq``.
"""
import torch

_applied = False


def load_from_local_trusted(filename, map_location=None):
    """mmengine's local-file loader with ``weights_only=False``.

    Why: torch >= 2.6 defaults ``torch.load(weights_only=True)``; mmengine 0.10.7's
    ``load_from_local`` calls ``torch.load`` without the argument, so every checkpoint
    that mmengine itself writes (``message_hub`` holds ``HistoryBuffer`` objects and numpy
    arrays) fails with ``UnpicklingError``. Local checkpoints are the user's own files, as
    trusted as under torch < 2.6. Registered through mmengine's own scheme registry
    (``force=True``), not by patching ``torch.load``.
    """
    import os.path as osp
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=False)


def apply():
    global _applied
    if _applied:
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local_trusted)
    _applied = True


def load_checkpoint_file(path, map_location='cpu'):
    """Load a local checkpoint file the way the patched mmengine does (for our own tools)."""
    apply()
    return load_from_local_trusted(path, map_location)
