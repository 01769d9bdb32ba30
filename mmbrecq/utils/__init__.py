from .compat import apply as apply_compat
from .compat import load_checkpoint_file, trusted_checkpoints
from .errors import CheckpointError, InputError, UnsafeCheckpointError, WorkDirBusy
from .io import WorkDirLock, atomic_json_dump, atomic_path, atomic_save, make_work_dir, to_plain

__all__ = [
    'apply_compat', 'load_checkpoint_file', 'trusted_checkpoints', 'InputError', 'CheckpointError',
    'UnsafeCheckpointError', 'WorkDirBusy', 'WorkDirLock', 'atomic_json_dump', 'atomic_path', 'atomic_save',
    'make_work_dir', 'to_plain'
]
