"""Runs one reference implementation (BRECQ: yhhhli/BRECQ, QDrop: wimh966/QDrop) on the
tensors that ``bench_vs_reference.py`` saved, in its own process, and writes top-1 and the
mean KL(float || quantized) on the test tensors as JSON.

The reference code is imported from a checkout given on the command line (it is never
copied into this repository) and driven the way its own ``main_imagenet.py`` drives it:
its ``QuantModel`` / ``quantize_model``, its reconstruction functions, its recipe. Only the
model and the data come from us: a network built from the reference's own ``ResNet`` and
``BasicBlock`` classes (its quantized-block rules match those classes only) with the float
model's widths, stem and strides, loaded with our weights under the reference's names.

The reference code is written for CUDA (``.cuda()``, ``device='cuda'``). Without a GPU this
process (and only this process) maps CUDA placements to the CPU before importing it.

    python benchmarks/_reference_driver.py --impl brecq --ref /path/to/BRECQ \
        --data data.pt --setting w4a4 --iters 300 --seed 0 --out result.json
"""
import argparse
import copy
import json
import os
import sys
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

#: what the reference-layout network must reproduce of our float logits
FLOAT_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- the float model
def to_reference_names(state_dict):
    """Our mmpretrain ResNet names -> the reference ``models/resnet.py`` names.

    ``backbone.conv1/bn1/layerN.i.*`` -> ``conv1/bn1/layerN.i.*`` and ``head.fc.*`` -> ``fc.*``;
    the data preprocessor's buffers are dropped (the saved tensors are already normalised).
    Anything else is an error, so a model of another layout fails here, not silently later.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith('data_preprocessor.'):
            continue
        if key.startswith('backbone.'):
            out[key[len('backbone.'):]] = value
        elif key.startswith('head.fc.'):
            out[key[len('head.'):]] = value
        else:
            raise ValueError(f'cannot map {key!r} onto the reference ResNet layout '
                             '(expected backbone.* or head.fc.*)')
    return out


def reference_resnet(resnet_module, arch):
    """The reference's own ``ResNet`` of ``BasicBlock`` with our widths, stem and strides.

    ``resnet_module``: the reference's ``models/resnet.py`` module; ``arch``: ``stem`` (channels,
    kernel, stride, padding), ``maxpool``, ``stage_blocks``, ``widths``, ``strides``,
    ``num_classes`` (see ``bench_vs_reference.resnet_arch``). The reference's constructor
    builds the ImageNet widths; its own ``_make_layer`` then rebuilds each stage at ours, and
    every attribute keeps its place in the module order (which its quantizers rely on).
    """
    block = resnet_module.BasicBlock
    net = resnet_module.ResNet(block, list(arch['stage_blocks']), num_classes=arch['num_classes'])
    stem = arch['stem']
    net.conv1 = nn.Conv2d(3, stem['channels'], stem['kernel'], stem['stride'], stem['padding'], bias=False)
    net.bn1 = nn.BatchNorm2d(stem['channels'])
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if arch['maxpool'] else nn.Identity()
    net.inplanes = stem['channels']
    for i, (blocks, width, stride) in enumerate(zip(arch['stage_blocks'], arch['widths'], arch['strides'])):
        setattr(net, f'layer{i + 1}', net._make_layer(block, width, blocks, stride=stride))
    net.fc = nn.Linear(arch['widths'][-1] * block.expansion, arch['num_classes'])
    return net


def load_reference_float(resnet_module, data):
    """The reference-layout float network with our weights; checks its logits against ours."""
    net = reference_resnet(resnet_module, data['arch'])
    net.load_state_dict(to_reference_names(data['float_state_dict']), strict=True)
    net.eval()
    with torch.no_grad():
        diff = max(float((net(x) - ref).abs().max()) for x, ref in zip(data['test_inputs'], data['fp_logits']))
    if not diff < FLOAT_TOLERANCE:
        raise SystemExit(f'the reference-layout float network differs from ours: max |logit diff| {diff:.3g} '
                         f'>= {FLOAT_TOLERANCE} (name mapping or architecture mismatch)')
    return net, diff


@torch.no_grad()
def top1_and_kl(model, inputs, labels, ref_logits, device):
    """As ``mmbrecq.engine.demo.top1_and_kl``: top-1 (%) and mean KL(softmax(ref) || softmax(model))."""
    correct, total, kl = 0, 0, 0.0
    for x, y, ref in zip(inputs, labels, ref_logits):
        logits = model(x.to(device)).cpu()
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
        kl += float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(ref, 1), log_target=True, reduction='sum'))
    return 100.0 * correct / total, kl / total


# ----------------------------------------------------------------------------- CPU shims
def _cpu_device(arg):
    if isinstance(arg, str) and arg.startswith('cuda'):
        return 'cpu'
    if isinstance(arg, torch.device) and arg.type == 'cuda':
        return torch.device('cpu')
    return arg


def install_cpu_shims():
    """Map the reference's CUDA placements onto the CPU (this process only): ``Tensor.to('cuda')``,
    ``Tensor.cuda()``, ``Module.cuda()``, ``torch.cuda.empty_cache()``."""
    tensor_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if 'device' in kwargs:
            kwargs['device'] = _cpu_device(kwargs['device'])
        return tensor_to(self, *[_cpu_device(a) for a in args], **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.empty_cache = lambda: None


class AttrDict(dict):
    """A dict with attribute access, nested (what QDrop's config object is: ``easydict.EasyDict``)."""

    def __init__(self, d=None, **kwargs):
        super().__init__()
        for k, v in dict(d or {}, **kwargs).items():
            self[k] = v

    def __setitem__(self, key, value):
        if isinstance(value, dict) and not isinstance(value, AttrDict):
            value = AttrDict(value)
        elif isinstance(value, (list, tuple)):
            value = type(value)(AttrDict(v) if isinstance(v, dict) else v for v in value)
        super().__setitem__(key, value)

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


def _provide_easydict():
    """QDrop's ``imagenet_utils`` imports ``easydict`` (not a dependency of ours): when it is not
    installed, this process gets a module whose ``EasyDict`` is :class:`AttrDict`."""
    try:
        import easydict  # noqa: F401
    except ImportError:
        sys.modules['easydict'] = types.SimpleNamespace(EasyDict=AttrDict)


# ----------------------------------------------------------------------------- BRECQ
def run_brecq(ref, data, w_bits, a_bits, iters, seed, device):
    """yhhhli/BRECQ ``main_imagenet.py`` with ``--channel_wise --act_quant`` (its README's command):
    first/last layer 8-bit, weight pass (every unit, ``opt_mode='mse'``, ``iters_w``), activation
    init on ``cali_data[:64]``, network output unquantized, activation pass (``iters_a``, lr 4e-4,
    p 2.4); ``iters_w = iters_a = iters``."""
    sys.path.insert(0, ref)
    import main_imagenet as brecq_main  # noqa: E402  (the reference checkout)
    from models import resnet as ref_resnet
    from quant import BaseQuantBlock, QuantModel, QuantModule, block_reconstruction, layer_reconstruction

    brecq_main.seed_all(seed)
    cnn, diff = load_reference_float(ref_resnet, data)
    cnn.to(device).eval()
    wq_params = {'n_bits': w_bits, 'channel_wise': True, 'scale_method': 'mse'}
    aq_params = {'n_bits': a_bits, 'channel_wise': False, 'scale_method': 'mse', 'leaf_param': True}
    qnn = QuantModel(model=cnn, weight_quant_params=wq_params, act_quant_params=aq_params)
    qnn.to(device).eval()
    qnn.set_first_last_layer_to_8bit()
    cali_data = data['cali'].to(device)
    qnn.set_quant_state(True, False)
    _ = qnn(cali_data[:64])
    kwargs = dict(cali_data=cali_data, iters=iters, weight=0.01, asym=True, b_range=(20, 2), warmup=0.2,
                  act_quant=False, opt_mode='mse')

    def recon_model(model):
        # main_imagenet.py's recon_model: layer reconstruction for single layers, block otherwise
        for _, module in model.named_children():
            if isinstance(module, QuantModule):
                if not module.ignore_reconstruction:
                    layer_reconstruction(qnn, module, **kwargs)
            elif isinstance(module, BaseQuantBlock):
                if not module.ignore_reconstruction:
                    block_reconstruction(qnn, module, **kwargs)
            else:
                recon_model(module)

    recon_model(qnn)
    qnn.set_quant_state(weight_quant=True, act_quant=False)
    qnn.set_quant_state(True, True)
    with torch.no_grad():
        _ = qnn(cali_data[:64])
    qnn.disable_network_output_quantization()
    kwargs = dict(cali_data=cali_data, iters=iters, act_quant=True, opt_mode='mse', lr=4e-4, p=2.4)
    recon_model(qnn)
    qnn.set_quant_state(weight_quant=True, act_quant=True)
    qnn.eval()
    return qnn, diff


# ----------------------------------------------------------------------------- QDrop
def qdrop_config(ref, w_bits, a_bits, iters, num_samples, seed):
    """QDrop's ResNet-18 config (``exp/w2a4/r18/config.yaml``, read with its own parser) with the
    bit widths, iterations, calibration size and seed of this run."""
    import imagenet_utils
    config = imagenet_utils.parse_config(os.path.join(ref, 'exp', 'w2a4', 'r18', 'config.yaml'))
    config.quant.w_qconfig.bit = w_bits
    config.quant.a_qconfig.bit = a_bits
    config.quant.recon.iters = iters
    config.quant.calibrate = num_samples
    config.process.seed = seed
    return config


def run_qdrop(ref, data, w_bits, a_bits, iters, seed, device):
    """wimh966/QDrop ``qdrop/solver/main_imagenet.py``: fold BN, its ``quantize_model`` (first and
    last layer weights and the last layer's input at 8 bits), observers on ``cali_data[:256]``
    (activations) and ``cali_data[:2]`` (weights), then ``reconstruction`` of every layer and block
    (AdaRound + LSQ steps jointly, drop probability 0.5)."""
    _provide_easydict()
    sys.path[:0] = [os.path.join(ref, 'qdrop', 'solver'), ref]
    import imagenet_utils
    import main_imagenet as qdrop_main  # noqa: E402  (the reference checkout)
    from fold_bn import search_fold_and_remove_bn
    from qdrop.model import resnet as ref_resnet
    from qdrop.quantization.observer import ObserverBase
    from qdrop.quantization.quantized_module import QuantizedBlock, QuantizedLayer
    from qdrop.quantization.state import disable_all, enable_calibration_woquantization, enable_quantization
    from recon import reconstruction

    cali_data = data['cali'].to(device)
    config = qdrop_config(ref, w_bits, a_bits, iters, cali_data.shape[0], seed)
    imagenet_utils.set_seed(config.process.seed)
    model, diff = load_reference_float(ref_resnet, data)
    search_fold_and_remove_bn(model)
    model = qdrop_main.quantize_model(model, config.quant)
    model.to(device).eval()
    fp_model = copy.deepcopy(model)
    disable_all(fp_model)
    for name, module in model.named_modules():
        if isinstance(module, ObserverBase):
            module.set_name(name)
    with torch.no_grad():
        enable_calibration_woquantization(model, quantizer_type='act_fake_quant')
        model(cali_data[:256])
        enable_calibration_woquantization(model, quantizer_type='weight_fake_quant')
        model(cali_data[:2])
    enable_quantization(model)

    def recon_model(module, fp_module):
        for name, child in module.named_children():
            if isinstance(child, (QuantizedLayer, QuantizedBlock)):
                reconstruction(model, fp_model, child, getattr(fp_module, name), cali_data, config.quant.recon)
            else:
                recon_model(child, getattr(fp_module, name))

    recon_model(model, fp_model)
    enable_quantization(model)
    model.eval()
    return model, diff


IMPLS = dict(brecq=run_brecq, qdrop=run_qdrop)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--impl', required=True, choices=sorted(IMPLS))
    p.add_argument('--ref', required=True, help='checkout of the reference repository')
    p.add_argument('--data', required=True, help='tensors saved by bench_vs_reference.py')
    p.add_argument('--setting', required=True, help='wXaY')
    p.add_argument('--iters', type=int, required=True)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, help='JSON result file')
    args = p.parse_args()
    w_bits, a_bits = (int(x) for x in args.setting.lower()[1:].split('a'))
    if not os.path.isdir(args.ref):
        raise SystemExit(f'--ref {args.ref!r} is not a directory (a checkout of the reference repository)')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu':
        install_cpu_shims()
    data = torch.load(args.data, map_location='cpu', weights_only=False)
    t0 = time.perf_counter()
    model, diff = IMPLS[args.impl](os.path.abspath(args.ref), data, w_bits, a_bits, args.iters, args.seed, device)
    seconds = time.perf_counter() - t0
    top1, kl = top1_and_kl(model, data['test_inputs'], data['test_labels'], data['fp_logits'], device)
    with open(args.out, 'w') as f:
        json.dump(dict(impl=args.impl, setting=args.setting, seed=args.seed, top1=top1, kl=kl, seconds=seconds,
                       float_logit_diff=diff), f)


if __name__ == '__main__':
    main()
