"""Extraction as Lightning ``predict``: features streamed shard by shard into a :class:`FeatureStore`.

Each predict step computes one whole store shard (a fixed index range), and a prediction writer saves
it atomically. Inside a step the extractor runs at most ``batch_size`` (image, timestep) rows per
forward, so a shard of 256 images × 7 timesteps never becomes one 1,792-row forward; the bytes on disk
do not depend on ``batch_size``. Because the unit of work is the shard, the same code runs on one process, resumes after
an interruption (only missing shards are scheduled), and runs under DDP, where Lightning's distributed
sampler deals shards out to ranks, with identical bytes on disk in every case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset, default_collate

from difffeat.extract import DEFAULT_BATCH_SIZE, FeatureExtractor, feature_name
from difffeat.readout import Readout
from difffeat.store import FeatureStore

__all__ = ["STORE_DTYPES", "ExtractionModule", "ShardDataset", "StoreWriter", "extract_to_store"]

#: dtypes features may be stored in
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ShardDataset(Dataset):
    """Serves the store's missing shards of ``dataset``: item ``j`` is one collated shard batch."""

    def __init__(self, dataset: Dataset, store: FeatureStore) -> None:
        self.dataset, self.store = dataset, store
        self.shards = store.missing_shards()

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, j: int) -> dict[str, Any]:
        k = self.shards[j]
        batch = default_collate([self.dataset[i] for i in self.store.shard_range(k)])
        batch["shard"] = k
        return batch


class ExtractionModule(L.LightningModule):
    """A frozen :class:`FeatureExtractor` as a LightningModule whose ``predict_step`` returns features.

    Args:
        backbone: a registered name, a local diffusers folder or a cached hub id.
        layers: tap names.
        timesteps: DDPM indices (0 = least noise).
        ensemble: noise draws averaged per feature.
        seed: noise seed.
        readout: the readout (default global average).
        backbone_kwargs: extra arguments for ``create_backbone``.
        batch_size: (image, timestep) rows per forward (does not change the features).
        store_dtype: dtype the features are stored in, ``"float32"`` (default), ``"float16"`` or
            ``"bfloat16"`` (halves per-pixel stores; part of the store key).
        noise: the noise key rule, ``"index"`` or ``"content"`` (see :mod:`difffeat.noise`).
        input_range: value range of the dataset's images if not ``[-1, 1]``.
    """

    def __init__(self, backbone: str, layers: list[str], timesteps: list[int], ensemble: int = 1, seed: int = 0,
                 readout: Readout | None = None, backbone_kwargs: dict[str, Any] | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, store_dtype: str = "float32", noise: str = "index",
                 input_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
        self.store_dtype = store_dtype
        self.extractor = FeatureExtractor.from_name(backbone, layers, timesteps, backbone_kwargs,
                                                    ensemble=ensemble, seed=seed, readout=readout,
                                                    batch_size=batch_size, noise=noise, input_range=input_range)

    def spec(self) -> dict[str, Any]:
        """The extractor's spec and the stored dtype: with the data, the store's key."""
        return {**self.extractor.spec(), "store_dtype": self.store_dtype}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """The tensors to store for a batch: its features, cast to ``store_dtype``, and its metadata.

        Features are named by :func:`feature_name`; ``index`` and whichever of ``label``, ``split`` and
        ``mask`` the batch holds are stored beside them.
        """
        feats = self.extractor(batch["image"], batch["index"])
        dtype = STORE_DTYPES[self.store_dtype]
        out = {feature_name(k): v.to(dtype) for k, v in feats.items()}
        out["index"] = torch.as_tensor(batch["index"])
        for extra in ("label", "split", "mask"):
            if extra in batch:
                out[extra] = torch.as_tensor(batch[extra])
        return out


class StoreWriter(BasePredictionWriter):
    """Writes each predicted shard to the store as soon as it is computed."""

    def __init__(self, store: FeatureStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Writes the batch's prediction as the shard ``batch["shard"]`` names."""
        self.store.write_shard(int(batch["shard"]), prediction)


def extract_to_store(model: ExtractionModule, dataset: Dataset, store: str | Path, shard_size: int = 256,
                     trainer: dict[str, Any] | None = None, num_workers: int = 0) -> FeatureStore:
    """Fills (or resumes) the feature store of ``model``'s features over ``dataset``.

    Args:
        model: the extraction module.
        dataset: items ``{"image", "index"[, "label"]}`` with a ``fingerprint`` attribute.
        store: the store folder.
        shard_size: samples per shard: the unit of resume and of DDP dealing (the forward batch is the
            model's ``batch_size``).
        trainer: ``lightning.Trainer`` arguments (e.g. ``{"devices": 2, "strategy": "ddp"}``).
        num_workers: loader workers.

    Returns:
        The store (complete unless the run was stopped).
    """
    fingerprint = getattr(dataset, "fingerprint", None)
    if fingerprint is None:
        raise TypeError(f"{type(dataset).__name__} has no 'fingerprint' attribute; feature stores are keyed by "
                        f"the data they hold, so the dataset must say what it is")
    spec = {**model.spec(), "dataset": fingerprint}
    fs = FeatureStore(store, spec, num_samples=len(dataset), shard_size=shard_size)
    todo = ShardDataset(dataset, fs)
    if len(todo):
        kwargs = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
                  **(trainer or {})}
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StoreWriter(fs)]
        L.Trainer(**kwargs).predict(model, DataLoader(todo, batch_size=None, num_workers=num_workers),
                                    return_predictions=False)
    return fs
