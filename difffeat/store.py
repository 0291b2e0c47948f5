"""``FeatureStore``: features on disk as safetensors shards, keyed, atomic and resumable.

Layout of a store folder::

    manifest.json                 # the key (hash of the spec), the spec itself, shard size, sample count
    shard_00000.safetensors       # samples [0, S), one tensor per feature name plus "index" (and labels)
    shard_00001.safetensors       # samples [S, 2S) ...

* The key is the SHA-256 of the spec: backbone weights digest, taps, timesteps, ensemble, seed, readout,
  dataset fingerprint, sample count and shard size. Opening a folder whose manifest holds another key
  is refused with the differing fields named, never silently reused.
* Shards cover fixed index ranges, so a shard's content does not depend on which shards were written
  before: an interrupted fill resumes with the missing shards and ends byte-identical to an
  uninterrupted one. Every shard is written to a temporary file, flushed and renamed into place, so a
  reader sees a whole shard or none.
* Each shard carries the SHA-256 of its tensor bytes in its safetensors metadata; a corrupt or
  truncated shard is reported by file name when read.
* Shards are independent files, so several processes (DDP ranks) can fill one store at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

__all__ = ["FeatureStore", "StoreError", "atomic_write", "spec_key"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """A store that cannot be used as asked: other settings, or a damaged shard."""


def spec_key(spec: Mapping[str, Any]) -> str:
    """SHA-256 of a spec's canonical JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, flushes it and renames it into place: readers
    see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FeatureStore:
    """A folder of feature shards for one (backbone, taps, timesteps, seed, dataset) spec.

    Args:
        root: the store folder (created if missing).
        spec: everything that determines the features; its hash is the store's key.
        num_samples: dataset length.
        shard_size: samples per shard (the last shard may be shorter).

    Raises:
        StoreError: ``root`` holds a store made with another spec.
    """

    def __init__(self, root: str | Path, spec: Mapping[str, Any], num_samples: int, shard_size: int = 256) -> None:
        if num_samples < 1 or shard_size < 1:
            raise ValueError(f"num_samples and shard_size must be >= 1, got {num_samples}, {shard_size}")
        self.root = Path(root)
        self.spec = {**spec, "num_samples": num_samples, "shard_size": shard_size, "format": FORMAT_VERSION}
        self.spec = json.loads(json.dumps(self.spec, sort_keys=True, default=str))  # canonical, JSON types
        self.key = spec_key(self.spec)
        self.num_samples, self.shard_size = num_samples, shard_size
        manifest = self.root / MANIFEST
        if manifest.exists():
            self._check_manifest(manifest)
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, json.dumps({"key": self.key, "spec": self.spec}, indent=2,
                                               sort_keys=True).encode())
        for stale in self.root.glob(".*.tmp-*"):  # left by a killed writer
            stale.unlink(missing_ok=True)

    def _check_manifest(self, manifest: Path) -> None:
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest} is not valid JSON ({err}); remove the folder to rebuild it") from err
        if old.get("key") == self.key:
            return
        old_spec = old.get("spec", {})
        diff = sorted(k for k in set(old_spec) | set(self.spec) if old_spec.get(k) != self.spec.get(k))
        raise StoreError(f"{self.root} holds features made with other settings (differing: {diff}); "
                         f"use another folder or delete this one")

    @classmethod
    def open(cls, root: str | Path) -> FeatureStore:
        """Opens an existing store for reading, with the spec its manifest records."""
        manifest = Path(root) / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest} not found: {root} is not a feature store")
        spec = json.loads(manifest.read_text())["spec"]
        return cls(root, spec, spec["num_samples"], spec["shard_size"])

    # ----------------------------------------------------------------- shards
    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, k: int) -> range:
        """Sample indices held by shard ``k``."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples))

    def shard_path(self, k: int) -> Path:
        return self.root / f"shard_{k:05d}.safetensors"

    def missing_shards(self) -> list[int]:
        """Shards not yet on disk (a resumed fill computes only these)."""
        return [k for k in range(self.num_shards) if not self.shard_path(k).exists()]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def write_shard(self, k: int, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Atomically writes shard ``k``; every tensor must have one row per sample of the shard."""
        rows = len(self.shard_range(k))
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        for name, t in tensors.items():
            if t.shape[0] != rows:
                raise ValueError(f"shard {k} holds {rows} samples but tensor {name!r} has shape {tuple(t.shape)}")
        # one metadata entry holding sorted JSON: safetensors keeps metadata in a hash map whose order
        # varies between processes, and shards must be byte-identical however they were made
        meta = json.dumps({"key": self.key, "shard": k, "sha256": _digest(tensors)}, sort_keys=True)
        path = self.shard_path(k)
        atomic_write(path, save(tensors, metadata={"difffeat": meta}))
        return path

    def read_shard(self, k: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Reads and verifies shard ``k`` (all tensors, or ``names``)."""
        path = self.shard_path(k)
        if not path.exists():
            raise StoreError(f"{path} is missing: the store is incomplete ({len(self.missing_shards())} of "
                             f"{self.num_shards} shards missing); run the extraction again to resume")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("difffeat", "{}"))
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except Exception as err:
            raise StoreError(f"{path} is corrupt or truncated ({err}); delete it and run the extraction "
                             f"again to rebuild it") from err
        if meta.get("key") != self.key:
            raise StoreError(f"{path} belongs to another store (key {meta.get('key')!r}, expected {self.key!r})")
        if meta.get("sha256") != _digest(tensors):
            raise StoreError(f"{path} is corrupt: its content does not match its checksum; delete it and run "
                             f"the extraction again to rebuild it")
        if names is not None:
            missing = [n for n in names if n not in tensors]
            if missing:
                raise KeyError(f"{path} has no tensor(s) {missing}; it holds {sorted(tensors)}")
            tensors = {n: tensors[n] for n in names}
        return tensors

    def load(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """All shards concatenated in sample order (verified)."""
        names = list(names) if names is not None else None
        parts = [self.read_shard(k, names) for k in range(self.num_shards)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def names(self) -> list[str]:
        """Tensor names held by the shards."""
        with safe_open(str(self.shard_path(0)), framework="pt") as f:
            return sorted(f.keys())
