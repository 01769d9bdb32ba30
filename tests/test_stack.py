"""The pinned OpenMMLab stack works under torch 2.9 on CPU.

(a) mmcv's compiled ops that the detectors rely on (NMS, batched NMS, RoIAlign),
    checked against results computed by hand;
(b) the configs shipped inside the installed mmpretrain / mmdet wheels build and run
    forward in 'tensor', 'predict' and 'loss' modes (plus one backward) on small inputs.

Models are built once per module (module-scoped fixtures) and without ``init_weights``
(no pretrained download, and plain torch init is enough for a smoke test).
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from mmcv.ops import RoIAlign, batched_nms, nms
from mmengine.config import Config
from mmengine.hub import get_config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import mmbrecq  # noqa: F401  (applies the compat shims, as in real use)

IMG = 128  # detector input side (divisible by the FPN's largest stride, 128)


@contextlib.contextmanager
def _scope(name):
    """Build / run inside one OpenMMLab scope, whatever ``register_all_modules`` set last."""
    with DefaultScope.overwrite_default_scope(name):
        yield


def _iou(a, b):
    ix = max(0., min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0., min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ---------------------------------------------------------------------------------------
# (a) mmcv ops
# ---------------------------------------------------------------------------------------
# A, B overlap with IoU 90/110 = 0.818; A, D with IoU 50/150 = 1/3; C is far away.
BOX_A = [0., 0., 10., 10.]
BOX_B = [1., 0., 11., 10.]
BOX_C = [20., 20., 30., 30.]
BOX_D = [5., 0., 15., 10.]


def test_hand_computed_ious():
    assert _iou(BOX_A, BOX_B) == pytest.approx(90 / 110)
    assert _iou(BOX_A, BOX_D) == pytest.approx(1 / 3)
    assert _iou(BOX_B, BOX_D) == pytest.approx(60 / 140)
    assert _iou(BOX_A, BOX_C) == 0


def test_nms_suppresses_overlap_above_threshold():
    boxes = torch.tensor([BOX_B, BOX_A, BOX_C])  # best box (A) not first on purpose
    scores = torch.tensor([0.8, 0.9, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # A kept (best), B suppressed (IoU 0.818 > 0.5 with A), C kept; sorted by score.
    assert keep.tolist() == [1, 2]
    assert dets.shape == (2, 5)
    torch.testing.assert_close(dets[:, :4], torch.tensor([BOX_A, BOX_C]))
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.9, 0.7]))
    # threshold above the IoU: nothing suppressed
    _, keep = nms(boxes, scores, iou_threshold=0.85)
    assert keep.tolist() == [1, 0, 2]


def test_nms_threshold_is_compared_to_iou():
    boxes = torch.tensor([BOX_A, BOX_D])  # IoU exactly 1/3
    scores = torch.tensor([0.9, 0.6])
    assert nms(boxes, scores, iou_threshold=0.5)[1].tolist() == [0, 1]
    assert nms(boxes, scores, iou_threshold=0.3)[1].tolist() == [0]
    # offset=1 (legacy pixel convention, w = x2 - x1 + 1): IoU(A, B) = 110/132 = 0.833
    assert nms(torch.tensor([BOX_A, BOX_B]), scores, 0.825, offset=1)[1].tolist() == [0]
    assert nms(torch.tensor([BOX_A, BOX_B]), scores, 0.84, offset=1)[1].tolist() == [0, 1]


def test_nms_numpy_and_score_threshold():
    np = pytest.importorskip('numpy')
    boxes = np.array([BOX_A, BOX_B, BOX_C], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.05], dtype=np.float32)
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert isinstance(dets, np.ndarray) and keep.tolist() == [0, 2]
    dets, keep = nms(boxes, scores, iou_threshold=0.5, score_threshold=0.1)
    assert keep.tolist() == [0]


def test_batched_nms_is_per_class():
    boxes = torch.tensor([BOX_A, BOX_B, BOX_C])
    scores = torch.tensor([0.9, 0.8, 0.7])
    cfg = dict(type='nms', iou_threshold=0.5)
    # A and B in different classes: both survive
    dets, keep = batched_nms(boxes, scores, torch.tensor([0, 1, 0]), cfg)
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(dets[:, :4], boxes)  # original coordinates, not offset ones
    torch.testing.assert_close(dets[:, 4], scores)
    # same class: B suppressed by A
    _, keep = batched_nms(boxes, scores, torch.tensor([3, 3, 0]), cfg)
    assert keep.tolist() == [0, 2]
    # class-agnostic: B suppressed although its class differs
    _, keep = batched_nms(boxes, scores, torch.tensor([0, 1, 0]), cfg, class_agnostic=True)
    assert keep.tolist() == [0, 2]
    # nms_cfg=None: no suppression, sorted by score
    _, keep = batched_nms(boxes, scores[[2, 1, 0]], torch.tensor([0, 0, 0]), None)
    assert keep.tolist() == [2, 1, 0]


def _ramp_features():
    """(2, 2, 16, 16): image 0 = [x ramp, y ramp] (value = column / row index), image 1 = 7."""
    idx = torch.arange(16.)
    feat = torch.empty(2, 2, 16, 16)
    feat[0, 0] = idx[None, :].expand(16, 16)
    feat[0, 1] = idx[:, None].expand(16, 16)
    feat[1] = 7.
    return feat


def test_roi_align_constant_map():
    feat = _ramp_features()
    rois = torch.tensor([[1., 2., 3., 12., 9.], [1., 0., 0., 16., 16.]])
    out = RoIAlign((3, 5), spatial_scale=1., sampling_ratio=2, aligned=True)(feat, rois)
    assert out.shape == (2, 2, 3, 5)
    torch.testing.assert_close(out, torch.full_like(out, 7.))


@pytest.mark.parametrize('aligned', [True, False])
def test_roi_align_linear_ramp(aligned):
    """Bilinear interpolation of a linear map is exact, and the average of the samples of a
    bin (symmetric about its centre) is the value at the centre: bin ``j`` of a box
    ``[x1, x2]`` cut into 4 bins of width 2 samples around ``x1 + 2j + 1``, shifted by
    -0.5 when ``aligned`` (pixel centres at half-integers)."""
    feat = _ramp_features()
    shift = 0.5 if aligned else 0.
    # roi (2, 3, 10, 11) on image 0, given at twice the feature resolution
    rois = torch.tensor([[0., 4., 6., 20., 22.]])
    op = RoIAlign((4, 4), spatial_scale=0.5, sampling_ratio=2, aligned=aligned)
    out = op(feat, rois)
    xs = torch.tensor([2. + 2 * j + 1 - shift for j in range(4)])  # 2.5, 4.5, 6.5, 8.5 aligned
    ys = torch.tensor([3. + 2 * i + 1 - shift for i in range(4)])  # 3.5, 5.5, 7.5, 9.5 aligned
    torch.testing.assert_close(out[0, 0], xs[None, :].expand(4, 4))
    torch.testing.assert_close(out[0, 1], ys[:, None].expand(4, 4))
    # max pooling keeps the larger of the two samples per axis: centre + 0.5
    out_max = RoIAlign((4, 4), 0.5, 2, pool_mode='max', aligned=aligned)(feat, rois)
    torch.testing.assert_close(out_max[0, 0], (xs + 0.5)[None, :].expand(4, 4))


def test_roi_align_outside_map_is_zero_and_backward_conserves_mass():
    feat = _ramp_features().requires_grad_(True)
    rois = torch.tensor([[0., 2., 3., 10., 11.], [1., 40., 40., 48., 48.]])
    out = RoIAlign((4, 4), 1., 2, aligned=True)(feat, rois)
    assert out[1].abs().sum() == 0  # every sample point lies beyond the map: contributes 0
    out.sum().backward()
    # each output of an interior roi spreads gradient 1 with bilinear weights summing to 1
    assert feat.grad[0].sum().item() == pytest.approx(2 * 16)
    assert feat.grad[1].abs().sum().item() == 0


def test_roi_align_matches_torchvision():
    tv_ops = pytest.importorskip('torchvision.ops')
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 20, 24, generator=g)
    rois = torch.tensor([[0., 1.3, 2.2, 17.9, 15.1], [1., 0., 0., 40., 30.], [1., 5.5, 6., 9., 7.]])
    for aligned in (True, False):
        ours = RoIAlign((5, 5), 0.5, 2, aligned=aligned)(feat, rois)
        ref = tv_ops.roi_align(feat, rois, (5, 5), 0.5, 2, aligned=aligned)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# (b) mmpretrain: ResNet-18 classifier
# ---------------------------------------------------------------------------------------
CLS_CFG = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'


def test_mmpretrain_config_from_wheel():
    cfg = get_config(CLS_CFG)
    assert cfg.model.type == 'ImageClassifier'
    assert cfg.model.backbone.type == 'ResNet' and cfg.model.backbone.depth == 18
    assert cfg.model.head.num_classes == 1000
    assert cfg.data_preprocessor.mean == [123.675, 116.28, 103.53]


def test_mmpretrain_base_config_inheritance(tmp_path):
    path = tmp_path / 'child.py'
    path.write_text(f"_base_ = '{CLS_CFG}'\n"
                    "model = dict(head=dict(num_classes=10))\n")
    cfg = Config.fromfile(str(path))
    assert cfg.model.backbone.depth == 18  # inherited
    assert cfg.model.head.num_classes == 10  # overridden
    assert cfg.model.head.in_channels == 512  # merged, not replaced
    assert cfg.data_preprocessor.std == [58.395, 57.12, 57.375]


@pytest.fixture(scope='module')
def classifier():
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = get_config(CLS_CFG)
    cfg.model.data_preprocessor = cfg.data_preprocessor  # what the Runner does
    torch.manual_seed(0)
    with _scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    return model


@pytest.fixture(scope='module')
def cls_batch():
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randint(0, 256, (3, 32, 32), generator=g).to(torch.uint8) for _ in range(2)]
    return imgs, lambda: [DataSample().set_gt_label(3), DataSample().set_gt_label(7)]


def _cls_data(model, cls_batch, training):
    imgs, samples = cls_batch
    return model.data_preprocessor({'inputs': imgs, 'data_samples': samples()}, training)


def test_mmpretrain_data_preprocessor(classifier, cls_batch):
    data = _cls_data(classifier, cls_batch, False)
    x = data['inputs']
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    expect = (cls_batch[0][0].float().flip(0) - mean) / std  # to_rgb: BGR -> RGB
    torch.testing.assert_close(x[0], expect)


def test_mmpretrain_tensor_and_predict(classifier, cls_batch):
    classifier.eval()
    data = _cls_data(classifier, cls_batch, False)
    with torch.no_grad():
        logits = classifier(data['inputs'], data['data_samples'], mode='tensor')
        preds = classifier(data['inputs'], data['data_samples'], mode='predict')
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert len(preds) == 2
    for k, p in enumerate(preds):
        assert type(p).__name__ == 'DataSample'
        assert p.pred_score.shape == (1000, )
        assert p.pred_score.sum().item() == pytest.approx(1., abs=1e-5)
        torch.testing.assert_close(p.pred_score, logits[k].softmax(0))
        assert p.pred_label.item() == logits[k].argmax().item()
        assert p.gt_label.tolist() == [(3, 7)[k]]


def test_mmpretrain_loss_and_backward(classifier, cls_batch):
    classifier.train()
    data = _cls_data(classifier, cls_batch, True)
    logits = classifier(data['inputs'], data['data_samples'], mode='tensor')
    losses = classifier(data['inputs'], data['data_samples'], mode='loss')
    assert set(losses) == {'loss'}
    loss = losses['loss']
    assert loss.dim() == 0 and torch.isfinite(loss)
    # train-mode BN uses batch statistics, identical for both calls
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([3, 7])))
    classifier.zero_grad()
    loss.backward()
    g = classifier.backbone.conv1.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    classifier.eval()


# ---------------------------------------------------------------------------------------
# (b) mmdet: Faster R-CNN and RetinaNet (ResNet-50 FPN)
# ---------------------------------------------------------------------------------------
FASTER = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
RETINA = 'retinanet/retinanet_r50_fpn_1x_coco.py'


def _build_detector(name, shrink):
    import mmdet.utils
    from mmdet.registry import MODELS
    mmdet.utils.register_all_modules()
    cfg = get_config(f'mmdet::{name}')
    cfg.model.backbone.init_cfg = None  # would download torchvision's ResNet-50 weights
    shrink(cfg.model)
    torch.manual_seed(0)
    with _scope('mmdet'):
        model = MODELS.build(cfg.model)
    return model.eval()


def _shrink_faster(model_cfg):
    # fewer proposals / sampled RoIs: same code paths, CPU-sized
    model_cfg.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model_cfg.train_cfg.rcnn.sampler.num = 64
    model_cfg.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    model_cfg.test_cfg.rcnn.score_thr = 0.  # random weights: keep detections to check them


def _shrink_retina(model_cfg):
    model_cfg.test_cfg.score_thr = 0.


@pytest.fixture(scope='module')
def faster_rcnn():
    return _build_detector(FASTER, _shrink_faster)


@pytest.fixture(scope='module')
def retinanet():
    return _build_detector(RETINA, _shrink_retina)


@pytest.fixture(scope='module')
def det_img():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (3, IMG, IMG), generator=g).to(torch.uint8)


def _det_samples():
    from mmdet.structures import DetDataSample
    s = DetDataSample(metainfo=dict(img_shape=(IMG, IMG), ori_shape=(IMG, IMG), scale_factor=(1., 1.),
                                    pad_shape=(IMG, IMG), batch_input_shape=(IMG, IMG)))
    gt = InstanceData()
    gt.bboxes = torch.tensor([[10., 20., 60., 90.], [50., 40., 120., 110.]])
    gt.labels = torch.tensor([1, 5])
    s.gt_instances = gt
    return [s]


def _det_data(model, img, training):
    return model.data_preprocessor({'inputs': [img], 'data_samples': _det_samples()}, training)


def _flat_losses(losses):
    for k, v in losses.items():
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            yield k, t


DETECTORS = ['faster_rcnn', 'retinanet']


@pytest.mark.parametrize('name', DETECTORS)
def test_mmdet_config_from_wheel(name):
    cfg = get_config(f'mmdet::{FASTER if name == "faster_rcnn" else RETINA}')
    assert cfg.model.type == {'faster_rcnn': 'FasterRCNN', 'retinanet': 'RetinaNet'}[name]
    assert cfg.model.backbone.depth == 50
    assert cfg.model.backbone.init_cfg.checkpoint == 'torchvision://resnet50'


def test_mmdet_data_preprocessor(faster_rcnn, det_img):
    data = _det_data(faster_rcnn, det_img, False)
    x = data['inputs']
    assert x.shape == (1, 3, IMG, IMG) and x.dtype == torch.float32
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(x[0], (det_img.float().flip(0) - mean) / std)  # bgr_to_rgb
    meta = data['data_samples'][0].metainfo
    assert tuple(meta['batch_input_shape']) == (IMG, IMG) and tuple(meta['pad_shape']) == (IMG, IMG)


def test_faster_rcnn_tensor(faster_rcnn, det_img):
    data = _det_data(faster_rcnn, det_img, False)
    with _scope('mmdet'), torch.no_grad():
        out = faster_rcnn(data['inputs'], data['data_samples'], mode='tensor')
    (cls_score, bbox_pred), = out  # one entry: the RoI head's (cls, reg)
    assert 0 < cls_score.shape[0] <= 100  # at most test_cfg.rpn.max_per_img proposals
    assert cls_score.shape[1:] == (81, ) and bbox_pred.shape == (cls_score.shape[0], 320)
    assert torch.isfinite(cls_score).all() and torch.isfinite(bbox_pred).all()


def test_retinanet_tensor(retinanet, det_img):
    data = _det_data(retinanet, det_img, False)
    with _scope('mmdet'), torch.no_grad():
        cls_scores, bbox_preds = retinanet(data['inputs'], data['data_samples'], mode='tensor')
    # P3-P7: strides 8..128 -> 16, 8, 4, 2, 1; 9 anchors x 80 classes / x 4 coords
    sides = [IMG // s for s in (8, 16, 32, 64, 128)]
    assert [tuple(c.shape) for c in cls_scores] == [(1, 720, s, s) for s in sides]
    assert [tuple(b.shape) for b in bbox_preds] == [(1, 36, s, s) for s in sides]


@pytest.mark.parametrize('name', DETECTORS)
def test_mmdet_predict(name, request, det_img):
    from mmdet.structures import DetDataSample
    model = request.getfixturevalue(name)
    model.eval()
    data = _det_data(model, det_img, False)
    with _scope('mmdet'), torch.no_grad():
        preds = model(data['inputs'], data['data_samples'], mode='predict')
    assert len(preds) == 1 and isinstance(preds[0], DetDataSample)
    pred = preds[0].pred_instances
    n = len(pred)
    assert 0 < n <= 100  # score_thr=0: detections exist; max_per_img=100
    assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n, ) and pred.labels.shape == (n, )
    b = pred.bboxes
    assert torch.isfinite(b).all()
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= IMG).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= IMG).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    assert ((pred.labels >= 0) & (pred.labels < 80)).all()
    assert ((pred.scores >= 0) & (pred.scores <= 1)).all()
    assert (pred.scores[:-1] >= pred.scores[1:]).all()  # sorted by score
    assert len(preds[0].gt_instances) == 2  # annotations travel with the sample


@pytest.mark.parametrize('name,keys', [
    ('faster_rcnn', {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'acc'}),
    ('retinanet', {'loss_cls', 'loss_bbox'}),
])
def test_mmdet_loss_and_backward(name, keys, request, det_img):
    model = request.getfixturevalue(name)
    model.train()
    try:
        data = _det_data(model, det_img, True)
        with _scope('mmdet'):
            losses = model(data['inputs'], data['data_samples'], mode='loss')
        assert set(losses) == keys
        for k, v in _flat_losses(losses):
            assert torch.isfinite(v).all(), f'{name}: {k} = {v}'
        loss, log_vars = model.parse_losses(losses)
        assert torch.isfinite(loss) and loss > 0
        assert math.isfinite(log_vars['loss'])
        model.zero_grad()
        loss.backward()
        g = model.backbone.layer4[0].conv1.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        # the config freezes the stem and stage 1 (frozen_stages=1): no gradient there
        assert model.backbone.conv1.weight.grad is None
        assert model.backbone.layer1[0].conv1.weight.grad is None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
