from .digits import DIGITS_CLASSES, DigitsDataset, load_digits_split

__all__ = ['DigitsDataset', 'load_digits_split', 'DIGITS_CLASSES']
