"""Datasets and datamodules.

Every dataset item is a dict with ``image`` (``(C, H, W)`` in ``[-1, 1]``),
``index`` (its position, which seeds its noise) and, where known, ``label``; every dataset has a
``fingerprint`` string that changes whenever its content does (feature stores are keyed by it).
"""

from difffeat.data.digits import DigitsDataModule, DigitsDataset, load_digits_split
from difffeat.data.stored import StoreDataModule

__all__ = ["DigitsDataModule", "DigitsDataset", "StoreDataModule", "load_digits_split"]
