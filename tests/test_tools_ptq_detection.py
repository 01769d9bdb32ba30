"""``tools/ptq.py`` / ``tools/test.py`` / ``tools/export.py`` on the two demo detectors
(RetinaNet, Faster R-CNN; slim ResNet-18 FPN trained on digits canvases, committed
checkpoints), on CPU with a few iterations: calibration through the detector's own train
pipeline, BRECQ over backbone blocks, FPN convs, RPN / RoI head layers and head towers,
CocoMetric evaluation (pycocotools), the saved model re-evaluated, and loss / predict
modes of the quantized model.

The child configs point ``DigitsCocoDataset`` at a small set in ``tmp_path`` (the first
canvases of the demo set: the generator seeds every canvas by its index) and CocoMetric
at its annotation file.
"""
import json
from pathlib import Path

import pytest
import torch

import mmbrecq  # noqa: F401

from _tools import load_tool, unique_name

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs' / 'brecq'


PTQ, TEST = load_tool('ptq'), load_tool('test')



def _child_config(tmp_path, base_name, iters=2):
    data = tmp_path / 'digits_coco'
    path = tmp_path / f'tiny_{Path(base_name).stem}.py'
    path.write_text(f"""\
_base_ = {str(CONFIGS / base_name)!r}
_data = dict(data_root={str(data)!r}, generate=dict(num_train=16, num_test=12))
train_dataloader = dict(batch_size=4, dataset=_data)
test_dataloader = dict(batch_size=4, dataset=_data)
test_evaluator = dict(ann_file={str(data / 'annotations' / 'test.json')!r})
float_checkpoint = {str(ROOT / 'checkpoints' / ('digits_retinanet_float.pth' if 'retinanet' in base_name
                                                 else 'digits_faster_rcnn_float.pth'))!r}
quant_cfg = dict(calib=dict(num_samples=8, batch_size=4, num_proposals=20),
                 recon=dict(iters={iters}, batch_size=4, progress=False))
""")
    return path


DETECTORS = [pytest.param('digits_det_retinanet_w4a8.py', id='retinanet'),
             pytest.param('digits_det_faster-rcnn_w4a8.py', id='faster-rcnn')]


@pytest.mark.parametrize('base_name', DETECTORS)
def test_ptq_detector_end_to_end(base_name, tmp_path, capsys):
    config = _child_config(tmp_path, base_name)
    work = tmp_path / 'work'
    rc = PTQ.main([str(config), '--work-dir', str(work), '--cfg-options', f'experiment_name={unique_name("p")}'])
    assert rc == 0
    summary = json.loads((work / 'summary.json').read_text())
    assert set(summary['metrics']) == {'fp', 'nearest', 'brecq'}
    for stage, m in summary['metrics'].items():
        assert 0 <= m['coco/bbox_mAP'] <= 1 and 0 <= m['coco/bbox_mAP_50'] <= 1, (stage, m)
    assert summary['metrics']['fp']['coco/bbox_mAP_50'] > 0.5  # the trained float detector
    units = {u['name']: u for u in summary['units']}
    assert all(u['status'] == 'ok' for u in units.values())
    assert units['backbone.layer1.0']['kind'] == 'BasicBlock'
    assert any(n.startswith('neck.fpn_convs') for n in units)
    if 'retinanet' in base_name:
        assert units['bbox_head.cls_convs']['kind'] == 'HeadTower' and units['bbox_head.cls_convs']['calls'] == 4
    else:
        assert {'rpn_head.rpn_conv', 'roi_head.bbox_head.shared_fcs.0', 'roi_head.bbox_head.fc_cls'} <= set(units)

    # the saved model re-evaluates to the same metrics
    capsys.readouterr()
    rc = TEST.main([str(config), str(work / 'quantized.pth'), '--work-dir', str(tmp_path / 'test'),
                    '--cfg-options', f'experiment_name={unique_name("t")}'])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"{summary['metrics']['brecq']['coco/bbox_mAP']:.4f}"[:5] in out or \
        str(summary['metrics']['brecq']['coco/bbox_mAP']) in out, out[-1500:]

    # loss and predict modes of the reloaded quantized model
    from mmdet.registry import DATASETS, MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from mmbrecq.engine import load_quantized
    cfg = Config.fromfile(str(config))
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        load_quantized(model, str(work / 'quantized.pth'))
        ds = DATASETS.build(dict(cfg.train_dataloader.dataset))
    batch = model.data_preprocessor(dict(inputs=[ds[0]['inputs'], ds[1]['inputs']],
                                         data_samples=[ds[0]['data_samples'], ds[1]['data_samples']]), True)
    model.train()
    losses = model(**batch, mode='loss')
    total = sum(v.sum() if torch.is_tensor(v) else sum(t.sum() for t in v) for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    model.eval()
    with torch.no_grad():
        preds = model(**model.data_preprocessor(dict(inputs=[ds[0]['inputs']], data_samples=[ds[0]['data_samples']]),
                                                False), mode='predict')
    assert preds[0].pred_instances.bboxes.shape[-1] == 4


def test_export_retinanet_float_and_onnx(tmp_path):
    """The quantized RetinaNet exported as a baked float checkpoint (loads strictly into the
    stock mmdet model: same parameter names, head towers included) and as ONNX QDQ."""
    config = _child_config(tmp_path, 'digits_det_retinanet_w4a8.py', iters=1)
    work = tmp_path / 'work'
    assert PTQ.main([str(config), '--work-dir', str(work), '--no-fp-eval', '--no-nearest-eval',
                     '--cfg-options', f'experiment_name={unique_name("e")}']) == 0
    export = load_tool('export')
    qckpt = str(work / 'quantized.pth')
    assert export.main([str(config), qckpt, '--format', 'float', '--out', str(tmp_path / 'baked.pth')]) == 0
    assert export.main([str(config), qckpt, '--format', 'onnx', '--shape', '1', '3', '128', '128',
                        '--out', str(tmp_path / 'r.onnx')]) == 0
    from mmengine.config import Config
    cfg = Config.fromfile(str(config))
    stock = export.build_model(cfg)
    state = torch.load(tmp_path / 'baked.pth', map_location='cpu', weights_only=True)['state_dict']
    stock.load_state_dict(state, strict=True)
    assert (tmp_path / 'r.onnx').stat().st_size > 10000
