"""The number of samples in a calibration batch, whatever its container."""
import torch


def batch_size(batch):
    """Samples in ``batch``: a tensor, an mmengine batch dict (``inputs``), or a list / tuple
    whose first element is one of those."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size(batch['inputs'])
    if isinstance(batch, (list, tuple)):
        return batch_size(batch[0])
    raise TypeError(f'cannot tell the batch size of a {type(batch).__name__} calibration batch')
