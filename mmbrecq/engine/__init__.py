from .calibration import build_calibration_set, calib_config, tensor_forward
from .hooks import QuantCheckpointHook, ReconLossPlotHook
from .ptq_loop import PTQLoop
from .quant_checkpoint import load_quantized, save_quantized

__all__ = [
    'PTQLoop', 'QuantCheckpointHook', 'ReconLossPlotHook', 'build_calibration_set',
    'calib_config', 'tensor_forward', 'save_quantized', 'load_quantized'
]
