"""Export a quantized checkpoint: ONNX (QDQ), integer checkpoint, or float checkpoint with baked weights.

    python tools/export.py CONFIG QUANT_CKPT --format onnx|int|float [--shape 1 3 224 224] [--out PATH]
                           [--opset 13] [--no-pack] [--cfg-options k=v ...]

- ``onnx``: QuantizeLinear/DequantizeLinear model of ``model(x, mode='tensor')`` (input:
  the preprocessed batch of shape ``--shape``, dynamic batch size; output: the logits).
- ``int``: integer weights (4-bit grids packed two per byte unless ``--no-pack``), scales,
  zero points, activation quantizers, bit map and quant_cfg; reload with
  ``mmbrecq.export.load_integer_checkpoint(model, path)``.
- ``float``: ``{'state_dict', 'meta'}`` in the float model's own keys with the quantized
  weights baked in (BN folded into identities); a stock model of CONFIG loads it
  (``strict=True``) and reproduces the weight-only quantized model.

The output defaults to the checkpoint's path with ``.onnx``, ``_int.pth`` or
``_float.pth`` in place of its extension and is written all or nothing. Bad input (a
missing file, a checkpoint that is not an mmbrecq quantized one, a ``--shape`` the model
cannot run) stops with an error naming it, exit code 2. Checkpoints are read with
``weights_only=True`` unless ``--trust-checkpoint``.
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if sys.path[:1] != [ROOT]:  # this checkout's mmbrecq, whichever one a shared environment installed
    sys.path.insert(0, ROOT)

FORMATS = ('onnx', 'int', 'float')
SUFFIX = {'onnx': '.onnx', 'int': '_int.pth', 'float': '_float.pth'}


def parse_args(argv=None):
    from mmbrecq.utils.cli import CfgOptionsAction, add_trust_argument
    parser = argparse.ArgumentParser(description='export an mmbrecq quantized checkpoint')
    parser.add_argument('config', help='the PTQ config the checkpoint was made with')
    parser.add_argument('checkpoint', help='quantized checkpoint (quantized.pth, written by tools/ptq.py)')
    parser.add_argument('--format', required=True, choices=FORMATS, help='what to export')
    parser.add_argument('--shape', type=int, nargs='+', default=[1, 3, 224, 224],
                        help='ONNX example input shape N C H W (default: 1 3 224 224)')
    parser.add_argument('--out', help='output path (default: next to the checkpoint)')
    parser.add_argument('--opset', type=int, default=13, help='ONNX opset (>= 13)')
    parser.add_argument('--no-pack', action='store_true', help='int: one code per byte, also for <= 4-bit grids')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction)
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    if args.format == 'onnx' and (len(args.shape) != 4 or any(d <= 0 for d in args.shape)):
        parser.error(f'--shape {" ".join(map(str, args.shape))}: expected 4 positive sizes N C H W of the '
                     'preprocessed batch, e.g. --shape 1 3 224 224')
    return args


def build_model(cfg):
    """The float model of ``cfg`` (classifier or detector: the registry of the config's
    ``default_scope``, which mmengine's root registry switches to; custom imports applied)."""
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import import_modules_from_strings
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg.custom_imports)
    scope = cfg.get('default_scope', 'mmpretrain')
    init_default_scope(scope)
    if scope == 'mmdet':  # mmdet registers its modules on import of mmdet.models
        import mmdet.models  # noqa: F401
    return MODELS.build(cfg.model).eval()


def default_out(checkpoint, fmt):
    return osp.splitext(checkpoint)[0] + SUFFIX[fmt]


def check_shape(model, shape):
    """Run ``model`` once on a batch of ``shape``: an InputError naming ``--shape`` when it cannot."""
    import torch
    from mmengine.model import BaseModel

    from mmbrecq.utils import InputError
    x = torch.zeros(*shape, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model(x, mode='tensor') if isinstance(model, BaseModel) else model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        reason = ' '.join(str(e).split())[:300]
        raise InputError(f'--shape {" ".join(map(str, shape))}: the model does not run on a batch of this shape '
                         f'({type(e).__name__}: {reason}); give N C H W of the preprocessed batch the model takes, '
                         'e.g. --shape 1 3 224 224') from e


def export(cfg, checkpoint, fmt, out, shape=(1, 3, 224, 224), opset=13, pack=True):
    """Load ``checkpoint`` into the model of ``cfg`` and write ``fmt`` to ``out``; return ``out``."""
    import torch

    from mmbrecq.engine import load_quantized
    from mmbrecq.export import bake_float_checkpoint, export_onnx, save_integer_checkpoint
    from mmbrecq.utils import atomic_save, make_work_dir
    from mmbrecq.version import __version__
    model, meta = load_quantized(build_model(cfg), checkpoint)
    model.eval()
    make_work_dir(osp.dirname(osp.abspath(out)))
    if fmt == 'onnx':
        check_shape(model, shape)
        device = next(model.parameters()).device
        export_onnx(model, torch.randn(*shape, device=device), out, opset=opset)
    elif fmt == 'int':
        save_integer_checkpoint(model, meta['quant_cfg'], out, pack=pack)
    else:
        state = bake_float_checkpoint(model, float_model=build_model(cfg))
        state = {k: v.cpu() for k, v in state.items()}
        atomic_save(dict(state_dict=state,
                         meta=dict(format='mmbrecq.baked_float.v1', mmbrecq_version=__version__,
                                   source=osp.abspath(checkpoint),
                                   note='quantized weights baked in, BN folded into identities; '
                                   'activations are not quantized in this float model')), out)
    return out


def main(argv=None):
    args = parse_args(argv)
    import mmbrecq  # noqa: F401  (registers everything, applies the torch-2.9 shims)
    from mmbrecq.utils import trusted_checkpoints
    from mmbrecq.utils.cli import load_config
    out = args.out or default_out(args.checkpoint, args.format)
    try:
        cfg = load_config(args.config, args.cfg_options)
        if not osp.isfile(args.checkpoint):
            raise FileNotFoundError(f'quantized checkpoint {args.checkpoint!r} does not exist')
        with trusted_checkpoints(args.trust_checkpoint):
            export(cfg, args.checkpoint, args.format, out, shape=args.shape, opset=args.opset,
                   pack=not args.no_pack)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, NotImplementedError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
