"""Per-layer parameter and MAC counts, measured from one real forward.

The cost models of the mixed-precision search (size, BOPs, latency) need, for every
quantizable layer, how many weights it stores and how many multiply-accumulates it does
per sample. Counting them from a forward with hooks (rather than from the module
attributes alone) gets the spatial sizes right for any input resolution, stride, padding
or dilation, and counts a layer called several times (shared modules) once per call.
"""
import dataclasses
import warnings
from typing import Any, Callable, List, Optional

import torch
from torch import nn

#: the layers a bit width can be chosen for; mmbrecq's QuantConv2d / QuantLinear and
#: mmcv's wrappers subclass them, so float and quantized models give the same table
TRACED_TYPES = (nn.Conv2d, nn.Linear)


@dataclasses.dataclass(frozen=True)
class LayerStat:
    """What the cost models need to know about one layer.

    Attributes:
        name: the module's name in ``model.named_modules()`` (the key of a bit config).
        params: number of weight parameters (the bias stays in float and is not counted:
            it is what the weight bit width changes).
        macs: multiply-accumulates per sample in the traced forward (0 if never called).
    """

    name: str
    params: int
    macs: int


def _num_samples(batch: Any) -> int:
    """Batch size of ``batch``: first dimension of its first tensor.

    A dict is searched under ``'inputs'`` first (mmengine data batches), then its values;
    a list of per-sample tensors (un-collated mmengine inputs) counts its length.
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        if 'inputs' in batch:
            return _num_samples(batch['inputs'])
        for value in batch.values():
            try:
                return _num_samples(value)
            except ValueError:
                continue
    if isinstance(batch, (list, tuple)) and batch:
        if all(isinstance(b, torch.Tensor) for b in batch) and len({b.dim() for b in batch}) == 1 \
                and batch[0].dim() == 3:
            return len(batch)  # list of CHW images, one per sample
        return _num_samples(batch[0])
    raise ValueError(f'cannot infer the batch size of a {type(batch).__name__}; '
                     'pass num_samples=')


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call over the whole batch, from the output shape."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    # nn.Linear: every output element is one dot product of length in_features
    return output.numel() * module.in_features


@torch.no_grad()
def trace_layer_stats(model: nn.Module,
                      forward: Optional[Callable[[nn.Module, Any], Any]],
                      batch: Any,
                      num_samples: Optional[int] = None) -> List[LayerStat]:
    """Count weights and per-sample MACs of every Conv2d / Linear of ``model``.

    The model runs once in eval mode (so batch norm neither needs more than one sample nor
    updates its statistics) and without gradients; the train/eval flag of every submodule
    is restored afterwards.

    Args:
        model: float or quantized model (quantizers must be usable if enabled).
        forward: ``forward(model, batch)``, as in ``calibrate_activations`` (e.g.
            ``lambda m, x: m(x, mode='tensor')``); ``None`` calls ``model(batch)``.
        batch: one input batch; MACs are divided by its size.
        num_samples: batch size, when it cannot be read from ``batch``.

    Returns:
        One :class:`LayerStat` per layer, in ``named_modules`` order. Layers the forward
        never reaches (e.g. an ``nn.MultiheadAttention`` projection called functionally)
        get ``macs=0`` and a warning.
    """
    n = num_samples if num_samples is not None else _num_samples(batch)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, TRACED_TYPES)]
    macs = {name: 0 for name, _ in layers}
    called = set()

    def hook_for(name):
        def hook(module, inputs, output):
            macs[name] += _layer_macs(module, output)
            called.add(name)
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        (forward or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    missed = [name for name, _ in layers if name not in called]
    if missed:
        warnings.warn(f'layers not reached by the forward (counted with 0 MACs): {missed}')
    return [LayerStat(name, m.weight.numel(), macs[name] // n) for name, m in layers]
