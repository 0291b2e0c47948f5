"""``StoreDataModule``: train a head from a feature store, streamed shard by shard."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

from difffeat.store import StoreDataset

__all__ = ["StoreDataModule"]


class StoreDataModule(L.LightningDataModule):
    """Batches of stored features (and the labels stored beside them) for a head that reads a store.

    The head is a :class:`~heads.base.FrozenFeatureModule` built with ``store=``.

    The store's ``split`` tensor says which samples train (``train_split``) and which validate
    (``val_split``); memory stays one shard whatever the store's size.

    Args:
        store: the feature-store folder.
        names: tensors to read (default all).
        batch_size: samples per batch.
        seed: shuffle seed of the training stream.
        train_split: ``split`` value of training samples.
        val_split: ``split`` value of validation and test samples.
    """

    def __init__(self, store: str, names: Sequence[str] | None = None, batch_size: int = 128, seed: int = 0,
                 train_split: int = 0, val_split: int = 1) -> None:
        super().__init__()
        self.store, self.names, self.batch_size, self.seed = store, names, batch_size, seed
        self.train_split, self.val_split = train_split, val_split

    def train_dataloader(self) -> DataLoader:
        """Batches of the ``train_split`` samples, shuffled (seeded, a new order each epoch)."""
        return DataLoader(StoreDataset(self.store, self.names, shuffle=True, seed=self.seed,
                                       where=("split", self.train_split)), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Batches of the ``val_split`` samples, in store order."""
        return DataLoader(StoreDataset(self.store, self.names, where=("split", self.val_split)),
                          batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """The batches of :meth:`val_dataloader`."""
        return self.val_dataloader()
