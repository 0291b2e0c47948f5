"""scikit-learn's handwritten digits (1,797 real 8×8 scans, shipped inside the package).

Images are upsampled with bilinear interpolation (antialiased) to ``size × size`` and scaled to
``[-1, 1]``; the split is a fixed stratified 70/30 split (``random_state = seed``), 1,257 train and
540 test images.
"""

from __future__ import annotations

import hashlib
from functools import cache

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ["DigitsDataModule", "DigitsDataset", "load_digits_split"]

SPLITS = ("train", "test", "all")


@cache
def _load(size: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=digits.target,
                                           random_state=seed)
    train = (x[idx_train], y[idx_train])
    test = (x[idx_test], y[idx_test])
    return {"train": train, "test": test, "all": (torch.cat([train[0], test[0]]), torch.cat([train[1], test[1]]))}


def load_digits_split(split: str = "train", size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, size, size)`` in ``[-1, 1]`` and labels ``(N,)`` of one split.

    ``"all"`` is the train split followed by the test split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if size < 8:
        raise ValueError(f"size must be >= 8 (the scans are 8x8), got {size}")
    return _load(size, seed)[split]


class DigitsDataset(Dataset):
    """One split of the digits as ``{"image", "label", "index", "split"}`` items (split 0 = train, 1 = test).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (train then test).
        size: image side after upsampling.
        seed: seed of the stratified split.
    """

    def __init__(self, split: str = "train", size: int = 16, seed: int = 0) -> None:
        self.split, self.size, self.seed = split, size, seed
        self.images, self.labels = load_digits_split(split, size, seed)
        self.num_train = len(load_digits_split("train", size, seed)[1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        test = self.split == "test" or (self.split == "all" and i >= self.num_train)
        return {"image": self.images[i], "label": int(self.labels[i]), "index": i, "split": int(test)}

    @property
    def fingerprint(self) -> str:
        """A digest of the images, labels and split."""
        h = hashlib.sha256(f"digits:{self.split}:{self.size}:{self.seed}".encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


class DigitsDataModule(L.LightningDataModule):
    """Digits for training a backbone (train split, shuffled) and for extraction (``predict_split``).

    Args:
        size: image side.
        batch_size: batch size of every loader.
        seed: split seed.
        predict_split: the split served by ``predict_dataloader`` (features for probes need ``"all"``).
        num_workers: loader workers (0 is fastest for this in-memory data).
    """

    def __init__(self, size: int = 16, batch_size: int = 64, seed: int = 0, predict_split: str = "all",
                 num_workers: int = 0) -> None:
        super().__init__()
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.predict_split, self.num_workers = predict_split, num_workers

    def dataset(self, split: str) -> DigitsDataset:
        """The dataset of one split."""
        return DigitsDataset(split, self.size, self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the train split; the last incomplete batch is dropped."""
        return DataLoader(self.dataset("train"), batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Batches of the test split, in order."""
        return DataLoader(self.dataset("test"), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The batches of :meth:`val_dataloader`."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Batches of ``predict_split``, in order."""
        return DataLoader(self.dataset(self.predict_split), batch_size=self.batch_size,
                          num_workers=self.num_workers)
