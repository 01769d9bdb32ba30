"""The embedded demo dataset: scikit-learn's 8x8 handwritten digits as 32x32 RGB images.

``load_digits()`` ships inside scikit-learn (1797 real scans, 8x8, values 0..16), so the
demo needs no download. Every step from the raw scans to the images is deterministic:

* split: ``train_test_split(test_size=360, stratify=labels, random_state=0)``, i.e.
  1437 train / 360 test images with the same class balance;
* intensity: ``round(v * 255 / 16)`` to ``uint8``;
* size: 8x8 -> 32x32 with PIL's bilinear resize (``Image.Resampling.BILINEAR``), so a CIFAR-style
  backbone (``ResNet_CIFAR``) sees its usual input size;
* channels: the grey image repeated 3 times (HxWx3, RGB order, as CIFAR10 gives it).

Each item is ``dict(img=<32x32x3 uint8>, gt_label=<int>)``, the same layout as
mmpretrain's ``CIFAR10``, so mmpretrain pipelines start without ``LoadImageFromFile``
(``[dict(type='PackInputs')]`` is a complete test pipeline).
"""
from typing import List, Optional, Tuple

import numpy as np
from mmpretrain.datasets import BaseDataset

from mmbrecq.registry import DATASETS

DIGITS_CLASSES = tuple(str(i) for i in range(10))
#: sizes of the fixed stratified split
SPLIT_SIZES = dict(train=1437, test=360)
SPLIT_SEED = 0
IMG_SIZE = 32


def _upsample(img8: np.ndarray, size: int) -> np.ndarray:
    """8x8 uint8 grey -> size x size uint8 grey, PIL bilinear (deterministic)."""
    from PIL import Image
    # a 2-D uint8 array is an 'L' image; Image.Resampling exists since Pillow 9.1
    return np.asarray(Image.fromarray(img8).resize((size, size), Image.Resampling.BILINEAR))


def load_digits_split(split: str = 'train',
                      img_size: int = IMG_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """The images and labels of one split, as arrays.

    Returns:
        tuple: ``imgs`` (N x img_size x img_size x 3, uint8) and ``labels`` (N, int64).
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {tuple(SPLIT_SIZES)}, got {split!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise ImportError('DigitsDataset needs scikit-learn (pip install scikit-learn); '
                          'its digits data ship inside the package, nothing is downloaded') from e

    digits = load_digits()  # bundled with scikit-learn, read from its package data
    images = digits.images  # (1797, 8, 8) float64 in 0..16
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=SPLIT_SIZES['test'], stratify=labels, random_state=SPLIT_SEED)
    sel = np.asarray(train_idx if split == 'train' else test_idx)

    imgs8 = np.clip(np.rint(images[sel] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if img_size != 8:
        grey = np.stack([_upsample(im, img_size) for im in imgs8])
    else:
        grey = imgs8
    imgs = np.repeat(grey[..., None], 3, axis=-1)  # N x H x W x 3
    return np.ascontiguousarray(imgs), labels[sel]


@DATASETS.register_module()
class DigitsDataset(BaseDataset):
    """scikit-learn's handwritten digits, as an mmpretrain classification dataset.

    Args:
        split (str): ``'train'`` (1437 images) or ``'test'`` (360 images), a fixed
            stratified split (``random_state=0``).
        img_size (int): side of the square output images. Defaults to 32.
        test_mode (bool, optional): passed to :class:`BaseDataset`. Defaults to
            ``split == 'test'``.
        **kwargs: other arguments of mmpretrain's :class:`BaseDataset` (``pipeline``,
            ``indices``, ``metainfo``, ``serialize_data``, ...). ``ann_file`` and
            ``data_prefix`` are not used.

    Example:
        >>> ds = DATASETS.build(dict(type='mmbrecq.DigitsDataset', split='test',
        ...                          pipeline=[dict(type='PackInputs')]))
        >>> ds[0]['inputs'].shape
        torch.Size([3, 32, 32])
    """

    METAINFO = dict(classes=DIGITS_CLASSES)

    def __init__(self,
                 split: str = 'train',
                 img_size: int = IMG_SIZE,
                 test_mode: Optional[bool] = None,
                 metainfo: Optional[dict] = None,
                 **kwargs):
        if split not in SPLIT_SIZES:
            raise ValueError(f"split must be one of {tuple(SPLIT_SIZES)}, got {split!r}")
        self.split = split
        self.img_size = int(img_size)
        kwargs.setdefault('ann_file', '')
        super().__init__(
            metainfo=metainfo,
            test_mode=(split == 'test') if test_mode is None else test_mode,
            **kwargs)

    def load_data_list(self) -> List[dict]:
        imgs, labels = load_digits_split(self.split, self.img_size)
        return [dict(img=img, gt_label=int(label)) for img, label in zip(imgs, labels)]

    def extra_repr(self) -> List[str]:
        return [f'Split: \t{self.split} ({SPLIT_SIZES[self.split]} images, '
                f'{self.img_size}x{self.img_size}x3, from sklearn.datasets.load_digits)']
