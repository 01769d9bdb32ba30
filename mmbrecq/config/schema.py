"""A small declarative schema for nested config dicts: defaults, checks and the key path.

Each key of a :class:`Section` has a default and a check; a check receives the value and
its full key path (``quant_cfg.recon.iters``) and raises :class:`ConfigError` (an
``InputError``: the tools print it and exit 2) naming that path.
Sections nest (a key whose value is a section) and may be optional (``None`` allowed).
Validation returns a fresh, merged dict: the user's dict is never mutated.
"""
import copy
import numbers

from mmbrecq.utils.errors import InputError


class ConfigError(InputError):
    """A config value that cannot be used; the message names its full key path."""


class Section:
    """A dict-valued config entry.

    Args:
        keys: ``{name: Key or Section}``.
        optional: ``None`` is a valid value (the section is off).
        extra: ``extra(merged, unknown, path) -> merged`` for sections that accept keys
            decided at run time (a searcher's own arguments); without it, an unknown key
            is an error.
        finalize: ``finalize(merged, path) -> merged``: checks across keys.
        default_none: the section's default is ``None`` (with ``optional``).
    """

    def __init__(self, keys, optional=False, extra=None, finalize=None, default_none=False):
        self.keys, self.optional, self.extra, self.finalize = keys, optional, extra, finalize
        self.default_none = default_none

    def defaults(self):
        if self.default_none:
            return None
        return {k: (v.defaults() if isinstance(v, Section) else copy.deepcopy(v.default))
                for k, v in self.keys.items()}

    def validate(self, value, path):
        if value is None and self.optional:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f'{path} must be a dict{" or None" if self.optional else ""}, got {value!r}')
        value = dict(value)
        unknown = {k: value.pop(k) for k in list(value) if k not in self.keys}
        merged = {}
        for k, spec in self.keys.items():
            sub = f'{path}.{k}'
            if isinstance(spec, Section):
                v = value.get(k, {} if not spec.default_none else None)
                merged[k] = spec.validate(copy.deepcopy(v), sub)
            else:
                merged[k] = spec.validate(copy.deepcopy(value[k]) if k in value else copy.deepcopy(spec.default),
                                          sub, k in value)
        if unknown:
            if self.extra is None:
                raise ConfigError(f'unknown key(s) in {path}: {sorted(unknown)}; valid keys: {sorted(self.keys)}')
            merged = self.extra(merged, unknown, path)
        return self.finalize(merged, path) if self.finalize else merged


class Key:
    """One config value: its default and its check (``check(value, path) -> value``)."""

    def __init__(self, default, check=None):
        self.default, self.check = default, check

    def validate(self, value, path, given=True):
        if self.check is None or (not given and self.default is None):
            return value
        return self.check(value, path)


# -- checks --------------------------------------------------------------------------------
def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def positive_int(v, path):
    if not is_int(v) or v < 1:
        raise ConfigError(f'{path} must be a positive integer, got {v!r}')
    return v


def non_negative_int(v, path):
    if not is_int(v) or v < 0:
        raise ConfigError(f'{path} must be an integer >= 0, got {v!r}')
    return v


def integer(v, path):
    if not is_int(v):
        raise ConfigError(f'{path} must be an integer, got {v!r}')
    return v


def boolean(v, path):
    if not isinstance(v, bool):
        raise ConfigError(f'{path} must be True or False, got {v!r}')
    return v


def one_of(*choices):
    def check(v, path):
        if v not in choices:
            raise ConfigError(f'{path}={v!r}: expected one of {choices}')
        return v
    return check


def number_in(lo, hi, lo_open=False, hi_open=False):
    """A real number in the interval; ``None`` for an open end."""
    def check(v, path):
        ok = is_number(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (
            hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            left, right = ('(' if lo_open else '['), (')' if hi_open else ']')
            raise ConfigError(f'{path} must be a number in {left}{"-inf" if lo is None else lo}, '
                             f'{"inf" if hi is None else hi}{right}, got {v!r}')
        return v
    return check


def optional(check):
    """``None`` or what ``check`` accepts."""
    return lambda v, path: None if v is None else check(v, path)


def list_of(check, what='a list'):
    def run(v, path):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f'{path} must be {what}, got {v!r}')
        return [check(x, f'{path}[{i}]') for i, x in enumerate(v)]
    return run


def string(v, path):
    if not isinstance(v, str):
        raise ConfigError(f'{path} must be a string, got {v!r}')
    return v


def registered(registry, what):
    """A dict with a ``type`` registered in ``registry`` (the rest is the class's own arguments)."""
    def check(v, path):
        if not isinstance(v, dict) or 'type' not in v:
            raise ConfigError(f'{path} must be a dict with a "type" key, got {v!r}')
        name_of(registry, what)(v['type'], f'{path}.type')
        return dict(v)
    return check


def name_of(registry, what):
    """The name of a class registered in ``registry``."""
    def check(v, path):
        if not isinstance(v, str) or registry.get(v) is None:
            raise ConfigError(f'{path}={v!r} is not a registered {what}; registered: {sorted(registry.module_dict)}')
        return v
    return check
