"""The detection demo's data (mmbrecq.DigitsCocoDataset) and its two float detectors.

Sets are generated tiny (8 canvases per split) into tmp dirs; the committed checkpoints
are only run on a batch of two canvases.
"""
import json
import os
import os.path as osp
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mmbrecq  # noqa: F401  (registries, torch>=2.6 checkpoint-loading fix)
from mmbrecq.datasets import DIGITS_CLASSES, DigitsCocoDataset, load_digits_split
from mmbrecq.datasets.digits import _upsample
from mmbrecq.datasets.digits_detection import (
    DEFAULT_PARAMS,
    GENERATOR_VERSION,
    INK_THRESHOLD,
    STAMP_FILE,
    ensure_digits_coco,
    make_digits_coco,
    read_stamp,
)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {m: osp.join(ROOT, 'configs', '_base_', f'digits_{m}_float.py')
           for m in ('retinanet', 'faster_rcnn')}
CHECKPOINTS = {m: osp.join(ROOT, 'checkpoints', f'digits_{m}_float.pth') for m in CONFIGS}
TINY = dict(num_train=8, num_test=8)


def _load(root, split):
    with open(osp.join(root, 'annotations', f'{split}.json')) as f:
        coco = json.load(f)
    imgs = {im['id']: np.asarray(Image.open(osp.join(root, split, im['file_name'])))
            for im in coco['images']}
    return coco, imgs


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('digits_coco') / 'set')
    make_digits_coco(root, **TINY)
    return root


def _test_cfg(model='retinanet'):
    from mmengine.config import Config
    return Config.fromfile(CONFIGS[model])


def _build_dataset(root, split='test', pipeline=None, **kwargs):
    from mmdet.registry import DATASETS
    from mmengine.registry import DefaultScope
    if pipeline is None:
        pipeline = _test_cfg().test_pipeline
    cfg = dict(type='mmbrecq.DigitsCocoDataset', data_root=root, split=split, generate=TINY,
               pipeline=pipeline)
    cfg.update(kwargs)
    # as in a Runner of an mmdet config: mmdet's registry, mmdet the default scope
    with DefaultScope.overwrite_default_scope('mmdet'):
        ds = DATASETS.build(cfg)
        items = [ds[i] for i in range(len(ds))]
    return ds, items


def test_deterministic(tiny, tmp_path):
    other = str(tmp_path / 'again')
    make_digits_coco(other, **TINY)
    for split in ('train', 'test'):
        path = osp.join('annotations', f'{split}.json')
        with open(osp.join(tiny, path), 'rb') as a, open(osp.join(other, path), 'rb') as b:
            assert a.read() == b.read()
        (_, imgs_a), (_, imgs_b) = _load(tiny, split), _load(other, split)
        assert imgs_a.keys() == imgs_b.keys()
        for k in imgs_a:
            assert np.array_equal(imgs_a[k], imgs_b[k])
    # another seed gives other canvases
    make_digits_coco(str(tmp_path / 'seed1'), seed=1, **TINY)
    seed1 = _load(str(tmp_path / 'seed1'), 'test')[1]
    assert not np.array_equal(_load(tiny, 'test')[1][1], seed1[1])


def test_layout_boxes_and_categories(tiny):
    assert read_stamp(tiny) == dict(version=GENERATOR_VERSION, params=dict(DEFAULT_PARAMS, **TINY))
    s = DEFAULT_PARAMS['canvas_size']
    for split in ('train', 'test'):
        coco, imgs = _load(tiny, split)
        assert [c['name'] for c in coco['categories']] == list(DIGITS_CLASSES)
        assert [c['id'] for c in coco['categories']] == list(range(1, 11))
        assert [im['id'] for im in coco['images']] == list(range(1, 9))
        n_anns = len(coco['annotations'])
        assert [a['id'] for a in coco['annotations']] == list(range(1, n_anns + 1))
        assert len(coco['annotations']) >= 8 * 2  # 1..5 per canvas, 3 on average
        covered = {k: np.zeros((s, s), bool) for k in imgs}
        for img in imgs.values():
            assert img.shape == (s, s, 3) and img.dtype == np.uint8
            assert (img == img[..., :1]).all()  # grey repeated to 3 channels
        for a in coco['annotations']:
            x, y, w, h = a['bbox']
            assert all(isinstance(v, int) for v in a['bbox'])
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= s and y + h <= s
            assert a['area'] == w * h and a['iscrowd'] == 0
            assert 1 <= a['category_id'] <= 10 and a['image_id'] in imgs
            px, py, size = a['paste']
            assert DEFAULT_PARAMS['min_size'] <= size <= DEFAULT_PARAMS['max_size']
            assert px <= x and py <= y and x + w <= px + size and y + h <= py + size
            # tight: ink on each of the box's four edges (noise only adds, never removes)
            ink = imgs[a['image_id']][y:y + h, x:x + w, 0] >= INK_THRESHOLD
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
            covered[a['image_id']][y:y + h, x:x + w] = True
        # outside the boxes: below-threshold digit fringes plus noise, nothing ink-like
        for k, img in imgs.items():
            assert img[..., 0][~covered[k]].max() < INK_THRESHOLD + DEFAULT_PARAMS['noise']
        # pasted squares never overlap
        for k in imgs:
            sq = [a['paste'] for a in coco['annotations'] if a['image_id'] == k]
            for i, (x1, y1, s1) in enumerate(sq):
                for x2, y2, s2 in sq[i + 1:]:
                    assert x1 + s1 <= x2 or x2 + s2 <= x1 or y1 + s1 <= y2 or y2 + s2 <= y1


def test_sources_split_and_rerender(tmp_path):
    """Without noise, the canvas is exactly its digits re-rendered from the named split."""
    root = str(tmp_path / 'clean')
    make_digits_coco(root, noise=0, **TINY)
    for split in ('train', 'test'):
        digits8, labels = load_digits_split(split, img_size=8)
        coco, imgs = _load(root, split)
        rendered = {k: np.zeros(v.shape[:2], np.uint8) for k, v in imgs.items()}
        for a in coco['annotations']:
            # train canvases only from train scans, test canvases only from test scans
            assert a['digit_split'] == split
            assert a['category_id'] - 1 == labels[a['digit_index']]
            x, y, size = a['paste']
            patch = (_upsample(digits8[a['digit_index'], ..., 0], size).astype(np.uint32)
                     * a['gain'] + 50) // 100
            region = rendered[a['image_id']][y:y + size, x:x + size]
            np.maximum(region, patch.astype(np.uint8), out=region)
        for k, img in imgs.items():
            assert np.array_equal(img[..., 0], rendered[k])


def test_first_canvases_do_not_depend_on_the_set_size(tiny, tmp_path):
    root = str(tmp_path / 'three')
    make_digits_coco(root, num_train=3, num_test=3)
    big, small = _load(tiny, 'test'), _load(root, 'test')
    assert small[0]['annotations'] == [a for a in big[0]['annotations'] if a['image_id'] <= 3]
    assert all(np.array_equal(small[1][k], big[1][k]) for k in small[1])


def test_dataset_and_test_pipeline(tiny):
    from mmbrecq.registry import DATASETS as MMBRECQ_DATASETS
    assert MMBRECQ_DATASETS.get('DigitsCocoDataset') is DigitsCocoDataset
    coco, imgs = _load(tiny, 'test')
    ds, items = _build_dataset(tiny, 'test')
    assert type(ds) is DigitsCocoDataset and len(ds) == 8 and ds.test_mode
    assert ds.metainfo['classes'] == DIGITS_CLASSES
    for item, im in zip(items, coco['images']):
        assert item['inputs'].shape == (3, 128, 128) and item['inputs'].dtype == torch.uint8
        # the Resize to the canvas size changes no pixel
        assert np.array_equal(item['inputs'].permute(1, 2, 0).numpy(), imgs[im['id']])
        sample = item['data_samples']
        assert sample.img_id == im['id'] and tuple(sample.scale_factor) == (1.0, 1.0)
        anns = [a for a in coco['annotations'] if a['image_id'] == im['id']]
        want = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)],
                            dtype=torch.float32)
        assert torch.equal(sample.gt_instances.bboxes.tensor, want)
        assert sample.gt_instances.labels.tolist() == [a['category_id'] - 1 for a in anns]
    train, items = _build_dataset(tiny, 'train', pipeline=_test_cfg('faster_rcnn').train_pipeline)
    assert len(train) == 8 and not train.test_mode
    assert len(items[0]['data_samples'].gt_instances) > 0


def test_stale_or_foreign_sets(tiny, tmp_path):
    root = str(tmp_path / 'stale')
    shutil.copytree(tiny, root)
    stamp = read_stamp(root)
    with open(osp.join(root, STAMP_FILE), 'w') as f:
        json.dump(dict(stamp, version=GENERATOR_VERSION - 1), f)
    open(osp.join(root, 'junk.txt'), 'w').close()
    ensure_digits_coco(root, **TINY)  # regenerated as a whole: the old directory is gone
    assert read_stamp(root) == stamp and not osp.exists(osp.join(root, 'junk.txt'))
    # other parameters: regenerated too (by the dataset, on construction)
    ds, _ = _build_dataset(root, 'test', generate=dict(num_train=4, num_test=5))
    assert len(ds) == 5 and read_stamp(root)['params']['num_test'] == 5
    # a current set is left alone
    mtime = os.stat(osp.join(root, STAMP_FILE)).st_mtime_ns
    ensure_digits_coco(root, num_train=4, num_test=5)
    assert os.stat(osp.join(root, STAMP_FILE)).st_mtime_ns == mtime
    # no temporary directories left behind
    assert sorted(os.listdir(tmp_path)) == ['stale']
    # a directory that is not a generated set is never replaced
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'mine.txt').write_text('x')
    with pytest.raises(FileExistsError):
        ensure_digits_coco(str(foreign), **TINY)
    assert (foreign / 'mine.txt').exists()


def _gt_as_predictions(root, shift=0.0):
    from mmdet.evaluation import CocoMetric
    coco, _ = _load(root, 'test')
    metric = CocoMetric(ann_file=osp.join(root, 'annotations', 'test.json'), metric='bbox')
    metric.dataset_meta = dict(classes=DIGITS_CLASSES)
    samples = []
    for im in coco['images']:
        anns = [a for a in coco['annotations'] if a['image_id'] == im['id']]
        boxes = torch.tensor([[x + shift, y, x + w + shift, y + h] for x, y, w, h in
                              (a['bbox'] for a in anns)], dtype=torch.float32)
        samples.append(dict(img_id=im['id'], ori_shape=(128, 128), pred_instances=dict(
            bboxes=boxes, scores=torch.ones(len(anns)),
            labels=torch.tensor([a['category_id'] - 1 for a in anns]))))
    metric.process({}, samples)
    return metric.evaluate(len(samples))


def test_coco_metric_on_ground_truth(tiny):
    res = _gt_as_predictions(tiny)
    assert res['coco/bbox_mAP'] == pytest.approx(1.0)
    assert res['coco/bbox_mAP_50'] == pytest.approx(1.0)
    # boxes 3 px off: still found at IoU 0.5, not at the strict thresholds
    res = _gt_as_predictions(tiny, shift=3.0)
    assert res['coco/bbox_mAP_50'] == pytest.approx(1.0) and res['coco/bbox_mAP'] < 0.9


def _checkpoint_state(model):
    assert osp.isfile(CHECKPOINTS[model]), \
        f'{CHECKPOINTS[model]} is missing: run tools/train_digits_det.py --model {model}'
    assert osp.getsize(CHECKPOINTS[model]) < 4 * 2**20
    # stripped: tensors and plain Python values only, so even weights_only=True reads it
    raw = torch.load(CHECKPOINTS[model], map_location='cpu', weights_only=True)
    assert set(raw) == {'meta', 'state_dict'}
    assert raw['meta']['dataset_meta']['classes'] == list(DIGITS_CLASSES)
    assert raw['meta']['test_metrics']['coco/bbox_mAP'] >= 0.5
    return raw['state_dict']


@pytest.mark.parametrize('model_name', sorted(CONFIGS))
def test_float_checkpoints_load_and_run(tiny, model_name):
    from mmdet.registry import MODELS
    from mmdet.structures.bbox import bbox_overlaps
    from mmengine.registry import DefaultScope
    from mmengine.structures import InstanceData
    state = _checkpoint_state(model_name)
    cfg = _test_cfg(model_name)
    _, items = _build_dataset(tiny, 'test', pipeline=cfg.test_pipeline)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        missing, unexpected = model.load_state_dict(state, strict=True)
        assert not missing and not unexpected
        data = dict(inputs=[it['inputs'] for it in items[:2]],
                    data_samples=[it['data_samples'] for it in items[:2]])
        model.eval()
        with torch.no_grad():
            batch = model.data_preprocessor(data, False)
            feats = model(**batch, mode='tensor')
            preds = model(**batch, mode='predict')
        model.train()
        losses = model(**model.data_preprocessor(data, True), mode='loss')
    assert len(feats) > 0 and all(torch.isfinite(t).all() for t in _flatten(feats))
    assert len(preds) == 2
    for pred, item in zip(preds, items[:2]):
        inst = pred.pred_instances
        assert isinstance(inst, InstanceData) and len(inst) > 0
        # the trained detector finds the ground truth: each gt box has a confident match
        gt = item['data_samples'].gt_instances
        iou = bbox_overlaps(gt.bboxes.tensor, inst.bboxes[inst.scores > 0.3])
        assert iou.shape[1] > 0 and (iou.max(dim=1).values > 0.5).all()
    total, _ = model.parse_losses(losses)  # what the train step backpropagates
    assert torch.isfinite(total) and total > 0
    total.backward()


def _flatten(x):
    if torch.is_tensor(x):
        return [x]
    return [t for y in x for t in _flatten(y)]


def test_runner_test_on_a_fresh_data_root(tmp_path):
    """Runner.test() builds the dataset (which writes the files) before CocoMetric reads them."""
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    root = str(tmp_path / 'fresh') + '/'
    cfg = _test_cfg('retinanet')
    cfg.test_dataloader.dataset.update(data_root=root, generate=TINY)
    cfg.test_evaluator.ann_file = root + 'annotations/test.json'
    cfg.update(work_dir=str(tmp_path / 'work'), load_from=CHECKPOINTS['retinanet'],
               experiment_name=f'digits_det_fresh_{os.getpid()}', log_level='WARNING')
    cfg.default_hooks.logger.interval = 1000
    assert not osp.exists(root)
    with DefaultScope.overwrite_default_scope('mmdet'):
        metrics = Runner.from_cfg(cfg).test()
    assert read_stamp(root)['params']['num_test'] == 8
    assert metrics['coco/bbox_mAP'] > 0.3
