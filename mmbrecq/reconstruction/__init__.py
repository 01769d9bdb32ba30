from .cache import CacheBudget, SampleCache
from .capture import CalibrationSet, StopForward, probe_units
from .config import DEFAULT_RECON, recon_config
from .objective import RoundingSchedule, fisher_weight, reconstruction_loss
from .optimize import NonFiniteLoss, optimise_unit
from .plot import plot_losses
from .reconstructor import BlockReconstructor, reconstruct
from .task_losses import ClassificationKL, DetectionDivergence

__all__ = [
    'CacheBudget', 'SampleCache', 'CalibrationSet', 'StopForward', 'probe_units', 'DEFAULT_RECON',
    'recon_config', 'RoundingSchedule', 'fisher_weight', 'reconstruction_loss', 'NonFiniteLoss',
    'optimise_unit', 'plot_losses', 'BlockReconstructor', 'reconstruct', 'ClassificationKL', 'DetectionDivergence'
]
