from .digits import DIGITS_CLASSES, DigitsDataset, load_digits_split

__all__ = ['DigitsDataset', 'load_digits_split', 'DIGITS_CLASSES']

try:  # the detection set needs mmdet; mmbrecq itself imports without it
    import mmdet  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    from .digits_detection import DigitsCocoDataset, ensure_digits_coco, make_digits_coco

    __all__ += ['DigitsCocoDataset', 'ensure_digits_coco', 'make_digits_coco']
