from .calibration import build_calibration_set, calib_dataloader_cfg, tensor_forward
from .hooks import QuantCheckpointHook
from .ptq_loop import PTQLoop
from .quant_checkpoint import load_quantized, save_quantized
from .runner_config import without_training

__all__ = [
    'PTQLoop', 'QuantCheckpointHook', 'build_calibration_set',
    'calib_dataloader_cfg', 'without_training', 'tensor_forward', 'save_quantized', 'load_quantized'
]
