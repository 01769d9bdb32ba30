"""A small real detection set: scikit-learn's digits pasted onto canvases, in COCO format.

The detection demo and tests need real images with boxes and no download. This module
composes the 8x8 scans of ``sklearn.datasets.load_digits`` (the same fixed split as
:mod:`mmbrecq.datasets.digits`) onto fixed-size grey canvases, deterministically:

* canvases: ``canvas_size`` x ``canvas_size`` (default 128), grey repeated to 3 channels,
  black background (the digits are light ink on black, as in scikit-learn);
* per canvas 1..5 digits (``max_digits``), each upscaled from 8x8 to a random square of
  ``min_size``..``max_size`` px (default 12..40) with PIL's bilinear resize (as
  :func:`~mmbrecq.datasets.digits.load_digits_split` does), dimmed by a random gain of
  60..100 %, pasted at a random position; pasted squares never overlap (a position is
  redrawn up to 50 times, a digit that still does not fit is dropped, so a few canvases
  have fewer digits than drawn);
* mild noise: every pixel gets ``uniform{0..noise}`` (default 12) added, then clipped;
* box: the tight extent of the pasted square's pixels above ``INK_THRESHOLD`` (40 of 255,
  before noise), as COCO ``[x, y, w, h]`` in pixel units (a pixel column ``c`` covers
  ``[c, c + 1)``); ``area = w * h``; ``iscrowd = 0``;
* categories ``'0'`` .. ``'9'`` with ids 1 .. 10 (``category_id = digit + 1``);
* train canvases only use digits of the train split (1437 scans), test canvases only
  those of the test split (360 scans): no digit scan is in both sets.

Every canvas has its own random stream (``seed``, split, canvas index), so a set of 8
canvases is the first 8 of the full set. Each annotation also records where its digit came
from (``digit_split``, ``digit_index`` into :func:`load_digits_split`, ``paste`` =
``[x, y, size]`` of the square, ``gain`` in %), enough to re-render the canvas.

Layout under ``data_root`` (default ``data/digits_coco``, owned by the generator)::

    VERSION.json                    generator version + parameters (the stamp)
    annotations/train.json          COCO json
    annotations/test.json
    train/000000.png ...            RGB PNGs
    test/000000.png ...

:func:`ensure_digits_coco` (called by :class:`DigitsCocoDataset` on construction)
regenerates the whole set when the stamp is missing or differs, into a temporary sibling
directory renamed into place at the end, so a crash never leaves a half-written set.
``python tools/make_digits_coco.py`` regenerates it explicitly.
"""
import json
import os
import os.path as osp
import shutil
import uuid
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmdet.datasets import CocoDataset

from mmbrecq.registry import DATASETS

from .digits import DIGITS_CLASSES, _upsample, load_digits_split

#: bump when the generated files change for the same parameters
GENERATOR_VERSION = 1
DEFAULT_DATA_ROOT = 'data/digits_coco'
STAMP_FILE = 'VERSION.json'
#: a pasted pixel at or above this value (0..255, before noise) is ink: it is in the box
INK_THRESHOLD = 40
#: category id of digit ``d`` is ``d + CATEGORY_ID_OFFSET`` (COCO ids start at 1)
CATEGORY_ID_OFFSET = 1
SPLITS = ('train', 'test')
_SPLIT_ID = dict(train=0, test=1)
_PLACEMENT_TRIES = 50

DEFAULT_PARAMS = dict(
    num_train=1500,
    num_test=250,
    canvas_size=128,
    min_digits=1,
    max_digits=5,
    min_size=12,
    max_size=40,
    min_gain=60,
    max_gain=100,
    noise=12,
    seed=0,
)


def digits_coco_params(**overrides) -> dict:
    """The generator parameters: :data:`DEFAULT_PARAMS` with ``overrides`` (checked)."""
    unknown = set(overrides) - set(DEFAULT_PARAMS)
    if unknown:
        raise TypeError(f'unknown digits-coco parameters {sorted(unknown)}; '
                        f'known: {sorted(DEFAULT_PARAMS)}')
    p = dict(DEFAULT_PARAMS)
    p.update({k: int(v) for k, v in overrides.items()})
    if not (1 <= p['min_digits'] <= p['max_digits']):
        raise ValueError('need 1 <= min_digits <= max_digits')
    if not (8 <= p['min_size'] <= p['max_size'] <= p['canvas_size']):
        raise ValueError('need 8 <= min_size <= max_size <= canvas_size')
    if not (0 < p['min_gain'] <= p['max_gain'] <= 100):
        raise ValueError('need 0 < min_gain <= max_gain <= 100')
    if not (0 <= p['noise'] < INK_THRESHOLD):
        raise ValueError(f'need 0 <= noise < {INK_THRESHOLD} (noise must not look like ink)')
    if p['num_train'] < 0 or p['num_test'] < 0:
        raise ValueError('num_train / num_test must be >= 0')
    return p


def _digit_patch(img8: np.ndarray, size: int, gain: int) -> np.ndarray:
    """8x8 uint8 grey -> size x size uint8, bilinear, times ``gain`` % (integer rounding)."""
    patch = _upsample(img8, size).astype(np.uint32)
    return ((patch * gain + 50) // 100).astype(np.uint8)


def ink_box(patch: np.ndarray, x: int, y: int) -> Optional[List[int]]:
    """COCO ``[x, y, w, h]`` of the pixels >= INK_THRESHOLD of ``patch`` pasted at (x, y)."""
    ys, xs = np.nonzero(patch >= INK_THRESHOLD)
    if len(xs) == 0:
        return None
    x1, y1 = int(xs.min()), int(ys.min())
    return [x + x1, y + y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1]


def compose_canvas(split: str, index: int, digits8: np.ndarray, labels: np.ndarray,
                   params: dict):
    """Compose canvas ``index`` of ``split``.

    Args:
        digits8 (ndarray): the split's 8x8 grey scans (N x 8 x 8 uint8).
        labels (ndarray): their digits (N,).

    Returns:
        tuple: the RGB canvas (H x W x 3 uint8) and a list of annotation dicts
        (``bbox``, ``category_id``, ``digit_split``, ``digit_index``, ``paste``, ``gain``)
        without ids.
    """
    p = params
    s = p['canvas_size']
    rng = np.random.default_rng([p['seed'], _SPLIT_ID[split], index])
    canvas = np.zeros((s, s), np.uint8)
    placed = []  # (x, y, size) of the squares pasted so far
    anns = []
    for _ in range(int(rng.integers(p['min_digits'], p['max_digits'] + 1))):
        src = int(rng.integers(0, len(digits8)))
        size = int(rng.integers(p['min_size'], p['max_size'] + 1))
        gain = int(rng.integers(p['min_gain'], p['max_gain'] + 1))
        for _try in range(_PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, s - size + 1, size=2))
            if all(x + size <= px or px + ps <= x or y + size <= py or py + ps <= y
                   for px, py, ps in placed):
                break
        else:
            continue  # no free spot for this one: drop it
        patch = _digit_patch(digits8[src], size, gain)
        box = ink_box(patch, x, y)
        if box is None:  # pragma: no cover  (every scan has ink; kept for safety)
            continue
        placed.append((x, y, size))
        region = canvas[y:y + size, x:x + size]
        np.maximum(region, patch, out=region)
        anns.append(dict(bbox=box, category_id=int(labels[src]) + CATEGORY_ID_OFFSET,
                         digit_split=split, digit_index=src, paste=[x, y, size], gain=gain))
    if p['noise']:
        noisy = canvas.astype(np.int32) + rng.integers(0, p['noise'] + 1, size=canvas.shape)
        canvas = np.clip(noisy, 0, 255).astype(np.uint8)
    return np.repeat(canvas[..., None], 3, axis=-1), anns


def _categories() -> List[dict]:
    return [dict(id=i + CATEGORY_ID_OFFSET, name=name, supercategory='digit')
            for i, name in enumerate(DIGITS_CLASSES)]


def _write_split(out_dir: str, split: str, params: dict) -> dict:
    from PIL import Image

    imgs, labels = load_digits_split(split, img_size=8)
    digits8 = np.ascontiguousarray(imgs[..., 0])
    num = params[f'num_{split}']
    s = params['canvas_size']
    os.makedirs(osp.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        canvas, anns = compose_canvas(split, i, digits8, labels, params)
        file_name = f'{i:06d}.png'
        Image.fromarray(canvas, 'RGB').save(osp.join(out_dir, split, file_name))
        images.append(dict(id=i + 1, file_name=file_name, width=s, height=s))
        for ann in anns:
            x, y, w, h = ann['bbox']
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, area=w * h,
                                    iscrowd=0, **ann))
    return dict(
        info=dict(description=f'sklearn digits composed on {s}x{s} canvases ({split})',
                  generator='mmbrecq.datasets.digits_detection',
                  version=GENERATOR_VERSION, params=params),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=_categories())


def _dump_json(obj, path: str) -> None:
    with open(path, 'w') as f:
        json.dump(obj, f, sort_keys=True, separators=(',', ':'))
        f.write('\n')


def _stamp(params: dict) -> dict:
    return dict(version=GENERATOR_VERSION, params=params)


def read_stamp(data_root: str) -> Optional[dict]:
    """The stamp of the set under ``data_root`` (None when missing or unreadable)."""
    try:
        with open(osp.join(data_root, STAMP_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_current(data_root: str, params: dict) -> bool:
    """Whether ``data_root`` holds a complete set of this version with these parameters."""
    if read_stamp(data_root) != _stamp(params):
        return False
    return all(osp.isfile(osp.join(data_root, 'annotations', f'{s}.json')) for s in SPLITS)


def make_digits_coco(data_root: str = DEFAULT_DATA_ROOT, force: bool = False,
                     **overrides) -> dict:
    """(Re)generate the set under ``data_root``; returns the parameters used.

    Nothing is written when the set is current, unless ``force``. Otherwise both splits
    are written into a temporary sibling directory that then replaces ``data_root`` (an
    existing ``data_root`` must be empty or a set of this generator, stale or not: other
    content is never deleted).
    """
    params = digits_coco_params(**overrides)
    data_root = osp.normpath(data_root)
    if not force and is_current(data_root, params):
        return params
    if osp.exists(data_root) and os.listdir(data_root) and read_stamp(data_root) is None:
        raise FileExistsError(
            f'{data_root!r} is not empty and has no {STAMP_FILE}: not a digits-coco set, '
            'refusing to replace it (choose another data_root or remove it yourself)')
    parent = osp.dirname(osp.abspath(data_root))
    os.makedirs(parent, exist_ok=True)
    tag = f'{os.getpid()}-{uuid.uuid4().hex[:8]}'
    tmp = osp.join(parent, f'.{osp.basename(data_root)}.tmp-{tag}')
    try:
        os.makedirs(osp.join(tmp, 'annotations'))
        for split in SPLITS:
            coco = _write_split(tmp, split, params)
            _dump_json(coco, osp.join(tmp, 'annotations', f'{split}.json'))
        _dump_json(_stamp(params), osp.join(tmp, STAMP_FILE))  # last: marks it complete
        old = None
        if osp.exists(data_root):
            old = osp.join(parent, f'.{osp.basename(data_root)}.old-{tag}')
            os.rename(data_root, old)
        try:
            os.rename(tmp, data_root)
        except OSError:
            # another process put a set there in the meantime: keep it if it is current
            if not is_current(data_root, params):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return params


def ensure_digits_coco(data_root: str = DEFAULT_DATA_ROOT, **overrides) -> dict:
    """Generate the set under ``data_root`` unless it is already current."""
    return make_digits_coco(data_root, force=False, **overrides)


@DATASETS.register_module()
class DigitsCocoDataset(CocoDataset):
    """scikit-learn's digits composed onto canvases, as an mmdet COCO detection dataset.

    The files are generated under ``data_root`` on construction when missing or stale
    (see :func:`ensure_digits_coco`), so configs and tests need no download and no
    preparation step.

    Args:
        split (str): ``'train'`` or ``'test'``; sets the default ``ann_file``
            (``annotations/{split}.json``) and ``data_prefix`` (``{split}/``).
        data_root (str): where the set lives. Defaults to ``data/digits_coco``.
        generate (dict, optional): generator parameters overriding
            :data:`DEFAULT_PARAMS` (``num_train``, ``num_test``, ``canvas_size``, ...).
            Configs sharing a ``data_root`` must agree on them.
        **kwargs: other arguments of mmdet's :class:`CocoDataset` (``pipeline``,
            ``test_mode``, ``filter_cfg``, ...).

    Example:
        >>> cfg = dict(type='mmbrecq.DigitsCocoDataset', split='test', pipeline=[...])
    """

    METAINFO = dict(
        classes=DIGITS_CLASSES,
        palette=[(220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 0, 230), (106, 0, 228),
                 (0, 60, 100), (0, 80, 100), (0, 0, 70), (0, 0, 192), (250, 170, 30)])

    def __init__(self,
                 split: str = 'test',
                 data_root: str = DEFAULT_DATA_ROOT,
                 generate: Optional[Dict[str, int]] = None,
                 ann_file: Optional[str] = None,
                 data_prefix: Optional[dict] = None,
                 test_mode: Optional[bool] = None,
                 **kwargs):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        self.split = split
        self.generate_params = ensure_digits_coco(data_root, **(generate or {}))
        super().__init__(
            data_root=data_root,
            ann_file=f'annotations/{split}.json' if ann_file is None else ann_file,
            data_prefix=dict(img=f'{split}/') if data_prefix is None else data_prefix,
            test_mode=(split == 'test') if test_mode is None else test_mode,
            **kwargs)


def digits_coco_ann_file(split: str = 'test', data_root: str = DEFAULT_DATA_ROOT,
                         **overrides) -> str:
    """Path of ``split``'s COCO json, generating the set first if needed (for CocoMetric)."""
    ensure_digits_coco(data_root, **overrides)
    return osp.join(data_root, 'annotations', f'{split}.json')


__all__: Sequence[str] = ('DigitsCocoDataset', 'make_digits_coco', 'ensure_digits_coco',
                          'compose_canvas', 'digits_coco_params', 'digits_coco_ann_file',
                          'DEFAULT_PARAMS', 'GENERATOR_VERSION', 'INK_THRESHOLD')
