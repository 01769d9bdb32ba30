from .compat import apply as apply_compat
from .compat import load_checkpoint_file

__all__ = ['apply_compat', 'load_checkpoint_file']
