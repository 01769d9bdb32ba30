"""The embedded demo's data (mmbrecq.DigitsDataset) and its float checkpoint."""
import os.path as osp

import numpy as np
import pytest
import torch

import mmbrecq  # noqa: F401  (registries, torch>=2.6 checkpoint-loading fix)
from mmbrecq.datasets import DIGITS_CLASSES, DigitsDataset, load_digits_split

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', '_base_', 'digits_resnet_float.py')
CHECKPOINT = osp.join(ROOT, 'checkpoints', 'digits_resnet18_float.pth')
#: the demo's float models: (config, checkpoint, tools/train_digits.py --model)
FLOAT_MODELS = [(CONFIG, CHECKPOINT, 'resnet18'),
                (osp.join(ROOT, 'configs', '_base_', 'digits_mobilenet_v3_float.py'),
                 osp.join(ROOT, 'checkpoints', 'digits_mobilenet_v3_float.pth'), 'mobilenet_v3')]


@pytest.fixture(scope='module')
def splits():
    return {s: load_digits_split(s) for s in ('train', 'test')}


def test_split_sizes_and_balance(splits):
    (xtr, ytr), (xte, yte) = splits['train'], splits['test']
    assert len(xtr) == len(ytr) == 1437
    assert len(xte) == len(yte) == 360
    assert len(DigitsDataset(split='train')) == 1437
    assert len(DigitsDataset(split='test')) == 360
    # stratified: every class in both splits, in the proportions of the full set (~10 % each)
    for y, n in ((ytr, 1437), (yte, 360)):
        counts = np.bincount(y, minlength=10)
        assert counts.min() > 0.08 * n and counts.max() < 0.12 * n


def test_images_and_labels(splits):
    for imgs, labels in splits.values():
        assert imgs.dtype == np.uint8 and imgs.shape[1:] == (32, 32, 3)
        assert labels.dtype == np.int64
        assert labels.min() == 0 and labels.max() == 9
        assert set(np.unique(labels).tolist()) == set(range(10))
        # grey repeated to 3 channels, full 0..255 range (ink at 16 -> 255)
        assert np.array_equal(imgs[..., 0], imgs[..., 1])
        assert np.array_equal(imgs[..., 0], imgs[..., 2])
        assert imgs.min() == 0 and imgs.max() == 255


def test_deterministic(splits):
    for split, (imgs, labels) in splits.items():
        imgs2, labels2 = load_digits_split(split)
        assert np.array_equal(imgs, imgs2) and np.array_equal(labels, labels2)
    a, b = DigitsDataset(split='test'), DigitsDataset(split='test')
    for i in (0, 17, 359):
        assert np.array_equal(a.get_data_info(i)['img'], b.get_data_info(i)['img'])
        assert a.get_data_info(i)['gt_label'] == b.get_data_info(i)['gt_label']


def test_data_info_and_metainfo():
    ds = DigitsDataset(split='test')
    assert ds.metainfo['classes'] == DIGITS_CLASSES == tuple('0123456789')
    assert ds.test_mode and not DigitsDataset(split='train').test_mode
    info = ds.get_data_info(0)
    assert info['img'].shape == (32, 32, 3) and info['img'].dtype == np.uint8
    assert isinstance(info['gt_label'], int) and 0 <= info['gt_label'] <= 9
    assert ds.get_gt_labels().shape == (360, )
    assert len(DigitsDataset(split='train', indices=64)) == 64
    with pytest.raises(ValueError):
        DigitsDataset(split='val')


def test_pipelines_from_config():
    """The config's train/test pipelines (mmpretrain transforms) accept 'img' directly."""
    from mmengine.config import Config
    cfg = Config.fromfile(CONFIG)
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        ds = DigitsDataset(split=loader.dataset.split, pipeline=loader.dataset.pipeline, indices=8)
        out = ds[3]
        assert out['inputs'].shape == (3, 32, 32) and out['inputs'].dtype == torch.uint8
        assert out['data_samples'].gt_label.item() == ds.get_data_info(3)['gt_label']
    # the test pipeline is a plain HWC -> CHW pack: pixels unchanged
    ds = DigitsDataset(split='test', pipeline=[dict(type='PackInputs')], indices=4)
    assert np.array_equal(ds[1]['inputs'].permute(1, 2, 0).numpy(), ds.get_data_info(1)['img'])


def test_builds_through_registries():
    from mmengine.registry import DATASETS, DefaultScope
    from mmpretrain.registry import DATASETS as MMPRETRAIN_DATASETS

    from mmbrecq.registry import DATASETS as MMBRECQ_DATASETS
    cfg = dict(type='mmbrecq.DigitsDataset', split='test', pipeline=[dict(type='PackInputs')])
    assert MMBRECQ_DATASETS.get('DigitsDataset') is DigitsDataset
    # from mmengine's root, from mmpretrain's registry, and with mmpretrain as default scope
    for registry in (DATASETS, MMPRETRAIN_DATASETS):
        ds = registry.build(dict(cfg))
        assert type(ds) is DigitsDataset and len(ds) == 360
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        ds = DATASETS.build(dict(cfg))
        assert type(ds) is DigitsDataset and ds[0]['inputs'].shape == (3, 32, 32)


def test_runner_builds_the_config_dataloader():
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    cfg = Config.fromfile(CONFIG)
    assert cfg.default_scope == 'mmpretrain'
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        loader = Runner.build_dataloader(cfg.test_dataloader)
        batch = next(iter(loader))
    assert len(loader.dataset) == 360
    assert len(batch['inputs']) == 64 and batch['inputs'][0].shape == (3, 32, 32)


@pytest.mark.parametrize('config,checkpoint,name', FLOAT_MODELS, ids=[m[2] for m in FLOAT_MODELS])
def test_float_checkpoint_accuracy(splits, config, checkpoint, name):
    """checkpoints/digits_<model>_float.pth loads into the config's model, >= 95 % top-1."""
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS

    assert osp.isfile(checkpoint), f'{checkpoint} is missing: run tools/train_digits.py --model {name}'
    assert osp.getsize(checkpoint) <= 5 * 2**20
    # stripped: tensors and plain Python values only, so even weights_only=True reads it
    raw = torch.load(checkpoint, map_location='cpu', weights_only=True)
    assert set(raw) == {'meta', 'state_dict'}
    assert raw['meta']['dataset_meta']['classes'] == list(DIGITS_CLASSES)

    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)
    ckpt = load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    assert 'meta' in ckpt
    model.eval()

    imgs, labels = splits['test']
    inputs = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(inputs), 120):
            data = model.data_preprocessor(dict(inputs=list(inputs[i:i + 120])), False)
            logits = model(data['inputs'], mode='tensor')
            correct += (logits.argmax(1).numpy() == labels[i:i + 120]).sum()
    acc = 100.0 * correct / len(labels)
    assert acc >= 95.0, f'float top-1 {acc:.2f}% < 95%'
