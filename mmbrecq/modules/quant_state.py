"""Which quantizers a swapped model holds, and switching them on and off together."""
from torch import nn

from mmbrecq.quantizers import UniformQuantizer


def quantizers_of(module: nn.Module, role=None):
    """All quantizers under ``module`` (optionally only ``'weight'`` or ``'act'`` ones)."""
    return [m for m in module.modules()
            if isinstance(m, UniformQuantizer) and (role is None or m.role == role)]


def set_quant_state(module: nn.Module, weight: bool = True, act: bool = True):
    """Enable/disable weight and activation quantization everywhere under ``module``."""
    for q in quantizers_of(module):
        q.enabled = weight if q.role == 'weight' else act
    return module
