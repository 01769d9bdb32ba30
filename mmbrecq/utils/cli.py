"""What the command-line tools share: reading the config and the options so that every
user error becomes one line naming the file, key or option (exit code 2), never a traceback."""
import ast
import os
import os.path as osp
import re

from mmengine.config import Config, DictAction

from .errors import InputError

__all__ = ['CfgOptionsAction', 'add_trust_argument', 'load_config', 'launcher_rank']


class CfgOptionsAction(DictAction):
    """mmengine's ``--cfg-options`` action; an item without ``=`` is a usage error (exit 2)
    instead of a ``ValueError`` from inside argparse."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in (values if isinstance(values, list) else [values]) if '=' not in v]
        if bad:
            parser.error(f'{option_string} {bad[0]!r}: expected KEY=VALUE items, e.g. quant_cfg.w_bits=2')
        super().__call__(parser, namespace, values, option_string)


def add_trust_argument(parser):
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='read checkpoints with the full unpickler (torch.load(weights_only=False)): only for files you '
        'trust, since they may run code; by default tensors, plain values and mmengine types only')


def _syntax_error(path, error):
    """``file, line N: message`` of a syntax error in ``path`` or, when the file itself
    parses, mmengine's message (the error is in one of its ``_base_`` files)."""
    try:
        with open(path) as f:
            ast.parse(f.read(), filename=path)
    except SyntaxError as e:
        text = f': {e.text.strip()}' if e.text and e.text.strip() else ''
        return f'config file {path}, line {e.lineno}: {e.msg}{text}'
    except (OSError, ValueError):
        pass
    message = re.sub(r'\s+', ' ', str(error))
    return f'config file {path}: {message}'


def load_config(path, cfg_options=None):
    """``Config.fromfile(path)`` merged with ``--cfg-options``; an :class:`InputError` naming
    the file (and the line of a syntax error) or the option when either cannot be used."""
    if not osp.isfile(path):
        raise InputError(f'config file {path!r} does not exist')
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as e:
        raise InputError(_syntax_error(path, e)) from e
    except Exception as e:  # noqa: BLE001 - executing the user's config failed: the config is the problem
        raise InputError(f'config file {path} cannot be read: {type(e).__name__}: {e}') from e
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f'--cfg-options {cfg_options}: {type(e).__name__}: {e}') from e
    return cfg


def launcher_rank(launcher):
    """This process's global rank as the launcher's environment states it (0 without one):
    known before any process group exists."""
    if launcher == 'none':
        return 0
    for key in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK', 'PMI_RANK'):
        if os.environ.get(key, '').isdigit():
            return int(os.environ[key])
    return 0

