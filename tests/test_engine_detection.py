"""Detectors in calibration and reconstruction: tagged raw head outputs, fixed float
proposals, and BRECQ end to end on small random Faster R-CNN / RetinaNet models."""
import pytest
import torch

import mmbrecq
from mmbrecq.engine.detection import attach_proposals, detection_forward, is_detector, is_two_stage
from mmbrecq.reconstruction import CalibrationSet

from _models import FAST_QCFG, build_classifier, build_detector, detection_batches

torch.set_num_threads(1)
K = 12  # proposals per image


@pytest.fixture(scope='module')
def faster():
    return build_detector('faster_rcnn')


@pytest.fixture(scope='module')
def retina():
    return build_detector('retinanet')


def test_kind_of_model(faster, retina):
    assert is_detector(faster) and is_two_stage(faster)
    assert is_detector(retina) and not is_two_stage(retina)
    assert not is_detector(build_classifier()) and not is_two_stage(torch.nn.Linear(2, 2))


def test_retinanet_outputs_are_the_tensor_mode_outputs_tagged(retina):
    batch = detection_batches(retina, n_batches=1)[0]
    out = detection_forward(retina, batch)
    cls, reg = retina(batch['inputs'], batch['data_samples'], mode='tensor')
    assert sorted(out) == ['cls', 'out1']
    assert out['cls']['kind'] == 'sigmoid' and out['out1']['kind'] == 'l2'
    assert len(out['cls']['values']) == len(cls) == 5
    assert all(torch.equal(a, b) for a, b in zip(out['cls']['values'], cls))
    assert all(torch.equal(a, b) for a, b in zip(out['out1']['values'], reg))


def test_two_stage_needs_fixed_proposals(faster):
    batch = detection_batches(faster, n_batches=1)[0]
    with pytest.raises(KeyError, match='attach_proposals'):
        detection_forward(faster, batch)


def test_fixed_proposals_are_the_float_models_best_and_padded(faster):
    batches = detection_batches(faster, n_batches=1)
    attach_proposals(faster, batches, K)
    props = batches[0]['proposals']
    assert len(props) == 2 and all(p.bboxes.shape == (K, 4) for p in props)
    with torch.no_grad():
        x = faster.extract_feat(batches[0]['inputs'])
        ref = faster.rpn_head.predict(x, batches[0]['data_samples'], rescale=False)
    n = min(K, len(ref[0]))
    assert torch.equal(props[0].bboxes[:n], ref[0].bboxes[:n])
    # more than survive NMS: repeated cyclically, never a made-up box
    attach_proposals(faster, batches, 500)
    p = batches[0]['proposals'][0].bboxes
    assert p.shape == (500, 4) and torch.equal(p[len(ref[0])], ref[0].bboxes[0])


def test_two_stage_outputs_rpn_and_roi_rows_per_proposal(faster):
    batches = attach_proposals(faster, detection_batches(faster, n_batches=1), K)
    out = detection_forward(faster, batches[0])
    assert sorted(out) == ['roi_cls', 'roi_out1', 'rpn_cls', 'rpn_reg']
    assert out['rpn_cls']['kind'] == 'sigmoid' and out['roi_cls']['kind'] == 'softmax'
    assert out['roi_cls']['values'][0].shape[0] == 2 * K  # images x proposals
    assert len(out['rpn_cls']['values']) == 5


@pytest.fixture(scope='module')
def reconstructed():
    """Both detectors quantized (W4A4), reconstructed a few steps with the detection loss."""
    done = {}
    for name in ('faster_rcnn', 'retinanet'):
        model = build_detector(name, seed=1)
        batches = detection_batches(model, n_batches=2, batch=2)
        if is_two_stage(model):
            attach_proposals(model, batches, K)
        calib = CalibrationSet(batches, detection_forward, task_loss=dict(type='DetectionDivergence'))
        with torch.no_grad():
            fp = detection_forward(model, batches[0])
        mmbrecq.quantize_model(model, FAST_QCFG)
        records = mmbrecq.reconstruct(model, calib, dict(iters=4, batch_size=2, progress=False))
        done[name] = model, batches, records, fp
    return done


@pytest.mark.parametrize('name', ['faster_rcnn', 'retinanet'])
def test_every_unit_reconstructs_finite(reconstructed, name):
    model, _, records, _ = reconstructed[name]
    names = [r['name'] for r in records]
    assert [u.name for u in mmbrecq.find_units(model)] and set(names) == {u.name for u in mmbrecq.find_units(model)}
    assert all(r['status'] == 'ok' and torch.isfinite(torch.tensor(r['loss_end'])) for r in records)
    kinds = {r['name']: r['kind'] for r in records}
    assert kinds['backbone.layer1.0'] == 'BasicBlock'
    assert any(n.startswith('neck.lateral_convs') for n in names)
    assert any(n.startswith('neck.fpn_convs') for n in names)
    if name == 'faster_rcnn':
        assert {'rpn_head.rpn_conv', 'rpn_head.rpn_cls', 'roi_head.bbox_head.shared_fcs.0',
                'roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg'} <= set(names)
        assert {r['name']: r['calls'] for r in records}['rpn_head.rpn_cls'] == 5  # once per level
    else:
        heads = {'bbox_head.cls_convs', 'bbox_head.reg_convs', 'bbox_head.retina_cls', 'bbox_head.retina_reg'}
        assert heads <= set(names)
        assert kinds['bbox_head.cls_convs'] == 'HeadTower'
        assert {r['name']: r['calls'] for r in records}['bbox_head.cls_convs'] == 5


@pytest.mark.parametrize('name', ['faster_rcnn', 'retinanet'])
def test_quantized_detector_keeps_every_mode(reconstructed, name):
    model, batches, _, fp = reconstructed[name]
    b = batches[0]
    with torch.no_grad():
        preds = model(b['inputs'], b['data_samples'], mode='predict')
        q = detection_forward(model, b)
    assert len(preds) == 2 and preds[0].pred_instances.bboxes.shape[1] == 4
    # quantized and float head outputs differ, but stay close
    key = 'cls' if name == 'retinanet' else 'roi_cls'
    a, f = q[key]['values'][0], fp[key]['values'][0]
    assert not torch.equal(a, f) and torch.isfinite(a).all()
    # loss mode needs annotations
    from mmengine.structures import InstanceData
    samples = [s.clone() for s in b['data_samples']]
    for s in samples:
        s.gt_instances = InstanceData(bboxes=torch.tensor([[4., 4., 30., 40.]]), labels=torch.tensor([3]))
    losses = model(b['inputs'], samples, mode='loss')
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(t.sum() for t in v) for k, v in losses.items()
                if 'loss' in k)
    assert torch.isfinite(total)
