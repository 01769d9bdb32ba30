"""mmbrecq: BRECQ post-training quantization as an OpenMMLab plugin.

Importing the package registers every component (quantizers, block rules,
reconstructors, loops, hooks, datasets) in mmbrecq's registries, children of mmengine's,
so ``custom_imports=dict(imports=['mmbrecq'])`` in a config is all a user needs.
"""
from .utils import apply_compat

apply_compat()

from . import blocks, datasets, engine, export, mixed_precision, quantizers, reconstruction, registry  # noqa: E402,F401
from .modules import QuantConfig, quantize_model, set_quant_state  # noqa: E402
from .reconstruction import CalibrationSet, calibrate_activations, find_units, reconstruct  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ['quantize_model', 'find_units', 'set_quant_state', 'calibrate_activations', 'QuantConfig',
           'reconstruct', 'CalibrationSet',
           '__version__']
