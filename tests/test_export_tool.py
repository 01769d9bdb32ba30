"""``tools/export.py`` on the digits demo config: onnx, int and float exports of a saved quantized model."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import load_checkpoint

import mmbrecq
from mmbrecq.engine import save_quantized
from mmbrecq.export import load_integer_checkpoint
from mmbrecq.modules import set_quant_state

from _tools import load_tool

torch.set_num_threads(1)  # 2-core CI

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'brecq' / 'digits_demo_w4a4.py'
FLOAT_CKPT = ROOT / 'checkpoints' / 'digits_resnet18_float.pth'
QCFG = dict(w_bits=4, a_bits=4, weight_quantizer=dict(type='AdaRoundQuantizer', init='minmax'),
            act_quantizer=dict(type='LSQQuantizer', init='minmax'))


EXPORT = load_tool('export')


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tensor(model, x):
    with torch.no_grad():
        return model(x, mode='tensor')


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    # the trained demo weights: a freshly initialised model folds identity BNs into zero biases, and
    # its integer-aligned conv outputs then hit rounding ties exactly, where PyTorch and onnxruntime
    # (different summation orders) may round one code apart
    cfg = Config.fromfile(str(CONFIG))
    float_model = EXPORT.build_model(cfg)
    load_checkpoint(float_model, str(FLOAT_CKPT), map_location='cpu', logger='silent')
    model = mmbrecq.quantize_model(float_model, QCFG)
    mmbrecq.calibrate_activations(model, [_images(8, seed=0)], lambda m, b: m(b, mode='tensor'))
    path = tmp_path_factory.mktemp('export_tool') / 'quantized.pth'
    save_quantized(model, str(path), QCFG)
    return dict(cfg=cfg, model=model, path=path, x=_images(3, seed=1))


def test_int_format(saved):
    assert EXPORT.main([str(CONFIG), str(saved['path']), '--format', 'int']) == 0
    out = saved['path'].with_name('quantized_int.pth')  # default output next to the checkpoint
    loaded = load_integer_checkpoint(EXPORT.build_model(saved['cfg']), str(out))
    assert torch.equal(_tensor(loaded, saved['x']), _tensor(saved['model'], saved['x']))


def test_float_format(saved, tmp_path):
    out = tmp_path / 'sub' / 'baked.pth'
    assert EXPORT.main([str(CONFIG), str(saved['path']), '--format', 'float', '--out', str(out)]) == 0
    ckpt = torch.load(out, map_location='cpu', weights_only=True)
    stock = EXPORT.build_model(saved['cfg'])
    stock.load_state_dict(ckpt['state_dict'], strict=True)
    model = saved['model']
    set_quant_state(model, weight=True, act=False)
    try:
        ref = _tensor(model, saved['x'])
    finally:
        set_quant_state(model, weight=True, act=True)
    out_float = _tensor(stock, saved['x'])
    assert ((out_float - ref).norm() / ref.norm()) < 1e-4


def test_onnx_format(saved, tmp_path):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    from mmbrecq.export import onnxruntime_session
    out = tmp_path / 'digits.onnx'
    argv = [str(CONFIG), str(saved['path']), '--format', 'onnx', '--shape', '1', '3', '32', '32',
            '--out', str(out)]
    assert EXPORT.main(argv) == 0
    sess = onnxruntime_session(str(out), threads=1)
    got = torch.from_numpy(sess.run(None, {'input': saved['x'].numpy()})[0])
    ref = _tensor(saved['model'], saved['x'])
    fc = saved['model'].head.fc
    step = (fc.input_quantizer.scale * fc.quantized_weight().abs().max()).item()
    assert (got - ref).abs().max() <= step


def test_bad_input(saved, tmp_path, capsys):
    assert EXPORT.main([str(tmp_path / 'nope.py'), str(saved['path']), '--format', 'int']) == 2
    assert 'config file' in capsys.readouterr().err
    assert EXPORT.main([str(CONFIG), str(tmp_path / 'nope.pth'), '--format', 'int']) == 2
    assert 'quantized checkpoint' in capsys.readouterr().err
    assert EXPORT.main([str(CONFIG), str(FLOAT_CKPT), '--format', 'float', '--out', str(tmp_path / 'x.pth')]) == 2
    assert 'not an mmbrecq quantized checkpoint' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        EXPORT.main([str(CONFIG), str(saved['path']), '--format', 'tflite'])
