"""``quant_cfg`` as the swap reads it: which bits each layer gets."""
import fnmatch

from mmbrecq.config import DEFAULTS, TENSOR_KINDS, ConfigError, act_bits, validate_quant_cfg

__all__ = ['QuantConfig', 'DEFAULTS']


def _at_least_8(a_bits):
    return None if a_bits is None else max(a_bits, 8)


class QuantConfig:
    """Parsed ``quant_cfg`` (validated and merged by :mod:`mmbrecq.config`, which owns every
    key, default and check) plus the per-layer bit decisions derived from it."""

    def __init__(self, quant_cfg):
        self.cfg = validate_quant_cfg(quant_cfg)
        self.w_bits, self.a_bits = self.cfg['w_bits'], self.cfg['a_bits']
        self.keep_8bit = list(self.cfg['keep_8bit'] or [])
        self.skip = list(self.cfg['skip'] or [])
        self.overrides = [dict(o) for o in self.cfg['overrides'] or []]

    def __getitem__(self, key):
        return self.cfg[key]

    def kind_quantizers(self):
        """``{tensor kind: quantizer cfg}`` for the kinds with their own quantizer type
        (``quant_cfg.transformer``)."""
        t = self.cfg['transformer']
        return {k: dict(t[k]) for k in TENSOR_KINDS if t[k] is not None}

    # -- per-layer decisions ------------------------------------------------------------
    def check_patterns(self, layer_names):
        """Every pattern must match at least one quantizable layer: a typo is an error."""
        def check(key, pattern):
            if not fnmatch.filter(layer_names, pattern):
                raise ConfigError(f'{key}: pattern {pattern!r} matches no quantizable layer; '
                                 f'layers are e.g. {layer_names[:3] + layer_names[-2:]}')
        for p in self.skip:
            check('quant_cfg.skip', p)
        for p in self.keep_8bit:
            if p not in ('first', 'last'):
                check('quant_cfg.keep_8bit', p)
        for i, o in enumerate(self.overrides):
            check(f'quant_cfg.overrides[{i}].pattern', o['pattern'])

    def is_skipped(self, name):
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def _kept_8bit(self, name, first, last):
        return any((p == 'first' and name == first) or (p == 'last' and name == last) or (
            p not in ('first', 'last') and fnmatch.fnmatchcase(name, p)) for p in self.keep_8bit)

    def fixes_w_bits(self, name, first, last):
        """Whether the config pins the layer's weight bits (``keep_8bit`` or an override with
        ``w_bits``): a mixed-precision search must leave them."""
        return self._kept_8bit(name, first, last) or any(
            'w_bits' in o and fnmatch.fnmatchcase(name, o['pattern']) for o in self.overrides)

    def bits_for(self, name, first, last, after_first=None):
        """(w_bits, a_bits) of the layer ``name``; ``a_bits`` is that of its input.

        ``first`` / ``last``: the first and last quantized layers; ``after_first``: the layer
        that reads the first one's output (the next quantized layer in model order). What
        ``keep_8bit``'s ``'first'`` / ``'last'`` keep at 8 bits follows ``convention``:

        - ``'mmbrecq'``: the first layer's weights and input (the image), the last layer's
          weights and input (the paper's "first and last layer 8-bit", input included);
        - ``'reference'``: as the reference code (``set_first_last_layer_to_8bit``): the
          first layer's weights and its *output* (``after_first``'s input), the image float,
          the last layer's weights only (its input at ``a_bits``).
        """
        w, a = self.w_bits, self.a_bits
        reference, keep = self.cfg['convention'] == 'reference', set(self.keep_8bit)
        if any(fnmatch.fnmatchcase(name, p) for p in keep - {'first', 'last'}):
            w, a = max(w, 8), _at_least_8(a)
        if 'first' in keep and name == first:
            w, a = max(w, 8), (None if reference else _at_least_8(a))   # reference: the image float
        if 'last' in keep and name == last:
            w, a = max(w, 8), (a if reference else _at_least_8(a))      # reference: input at a_bits
        if reference and 'first' in keep and name == after_first and name != first:
            a = _at_least_8(a)                                           # the first layer's output
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o['pattern']):
                w = o.get('w_bits', w)
                a = act_bits(o['a_bits'], 'a_bits') if 'a_bits' in o else a
        return w, a
