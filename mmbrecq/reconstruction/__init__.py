from .cache import CacheBudget, SampleCache
from .calibration import CalibrationSet, calibrate_activations
from .capture import StopForward, probe_units
from .objective import RoundingSchedule, fisher_weight, reconstruction_loss
from .optimize import NonFiniteLoss, optimise_unit
from .plot import ReconLossPlotHook, plot_losses
from .reconstructor import BlockReconstructor, reconstruct
from .targets import UnitTargets, build_task_loss
from .task_losses import ClassificationKL, DetectionDivergence
from .units import Unit, UnitData, UnitTrace, entry_quantizer, find_units, layer_units, unit_layers

__all__ = [
    'CacheBudget', 'SampleCache', 'CalibrationSet', 'calibrate_activations', 'StopForward', 'probe_units',
    'RoundingSchedule', 'fisher_weight', 'reconstruction_loss', 'NonFiniteLoss',
    'optimise_unit', 'plot_losses', 'ReconLossPlotHook', 'BlockReconstructor', 'reconstruct', 'UnitTargets',
    'build_task_loss', 'ClassificationKL', 'DetectionDivergence', 'Unit', 'UnitData', 'UnitTrace',
    'entry_quantizer', 'find_units', 'layer_units', 'unit_layers'
]
