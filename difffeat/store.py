"""``FeatureStore``: features on disk as safetensors shards, keyed, atomic and resumable.

Layout of a store folder::

    manifest.json                 # the key (hash of the spec), the spec itself, shard size, sample count
    shard_00000.safetensors       # samples [0, S), one tensor per feature name plus "index" (and labels)
    shard_00001.safetensors       # samples [S, 2S) ...

* The key is the SHA-256 of the spec: the backbone's complete :meth:`~difffeat.backbones.Backbone.spec`
  (weights, condition, schedule, VAE, plug-ins, dtype), taps, timesteps, ensemble, seed, noise rule,
  readout, stored dtype, dataset fingerprint, sample count and shard size. Opening a folder whose
  manifest holds another key is refused with the differing fields named (dotted paths such as
  ``backbone.condition.encoder_hidden_states``), never silently reused.
* Shards cover fixed index ranges, so a shard's content does not depend on which shards were written
  before: an interrupted fill resumes with the missing shards and ends byte-identical to an
  uninterrupted one. Every shard is written to a temporary file, flushed and renamed into place, so a
  reader sees a whole shard or none.
* Each shard carries the SHA-256 of each tensor in its safetensors metadata, so a reader of some
  tensors verifies just those; a corrupt or truncated shard is reported by file name when read.
* Shards are independent files, so several processes (DDP ranks) can fill one store at once. Temporary
  files are named after their writer (host and process id); opening a store removes only those whose
  writer is provably gone (this host, process no longer running).
* :class:`StoreDataset` streams a store shard by shard (only the requested tensors), so a head trains
  from stored features with memory independent of the store's size.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.utils.data import IterableDataset, get_worker_info

from difffeat.digest import spec_key, tensor_digest

__all__ = ["FeatureStore", "StoreDataset", "StoreError", "atomic_write", "spec_diff", "spec_key"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_HOST = socket.gethostname().replace("-", "_")
_TMP = re.compile(r"^\..+\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")


class StoreError(RuntimeError):
    """A store that cannot be used as asked: other settings, or a damaged shard."""


def spec_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the fields where two specs differ (``["backbone.schedule.alphas_cumprod"]``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            path = f"{prefix}.{k}" if prefix else str(k)
            out += spec_diff(old.get(k), new.get(k), path) if k in old and k in new else [path]
        return out
    return [] if old == new else [prefix]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Removes temporary files of writers that are provably gone and returns their paths.

    Provably gone: written on this host by a process that no longer runs. Another host's (shared file
    system) or a live process's files are kept.
    """
    removed = []
    for tmp in folder.glob(".*.tmp-*"):
        m = _TMP.match(tmp.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: readers see the old file or the whole new one, never a part.

    The data goes to a temporary file beside ``path``, is flushed and renamed into place. The temporary
    name holds the host, the process id and a random part, so concurrent writers never share one and
    stale ones can be told apart.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder(tmp: str | Path, out: str | Path) -> None:
    """Renames the finished folder ``tmp`` to ``out``, replacing an old ``out`` (all or nothing).

    An old ``out`` is renamed aside first (a name with the host, the process id and a random part), the new
    one renamed in and the old one deleted, so a reader sees the old folder or the whole new one.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


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
            if self.root.is_dir() and any(p.name != MANIFEST and not _TMP.match(p.name) for p in self.root.iterdir()):
                raise StoreError(f"{self.root} is not empty and holds no {MANIFEST}: not a feature store. "
                                 f"Give an empty or new folder")
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, json.dumps({"key": self.key, "spec": self.spec}, indent=2,
                                               sort_keys=True).encode())
        remove_stale_temps(self.root)

    def _check_manifest(self, manifest: Path) -> None:
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{manifest} is not valid JSON ({err}); remove the folder to rebuild it") from err
        if not isinstance(old, dict) or "key" not in old or "spec" not in old:
            raise StoreError(f"{manifest} is not a feature-store manifest (no 'key' and 'spec'): {self.root} "
                             f"is not a feature store")
        if old.get("key") == self.key:
            return
        diff = spec_diff(old["spec"], self.spec)
        raise StoreError(f"{self.root} holds features made with other settings (differing: {diff}); "
                         f"use another folder or delete this one")

    @classmethod
    def open(cls, root: str | Path) -> FeatureStore:
        """Opens an existing store for reading, with the spec its manifest records."""
        manifest = Path(root) / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest} not found: {root} is not a feature store")
        try:
            spec = json.loads(manifest.read_text())["spec"]
            num_samples, shard_size = spec["num_samples"], spec["shard_size"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise StoreError(f"{manifest} is not a feature-store manifest ({err!r}): {root} is not a feature "
                             f"store") from err
        return cls(root, spec, num_samples, shard_size)

    # ----------------------------------------------------------------- shards
    @property
    def num_shards(self) -> int:
        """The number of shards: ``num_samples / shard_size``, rounded up."""
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, k: int) -> range:
        """Sample indices held by shard ``k``."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples))

    def shard_path(self, k: int) -> Path:
        """The file of shard ``k``."""
        return self.root / f"shard_{k:05d}.safetensors"

    def missing_shards(self) -> list[int]:
        """Shards not yet on disk (a resumed fill computes only these)."""
        return [k for k in range(self.num_shards) if not self.shard_path(k).exists()]

    @property
    def complete(self) -> bool:
        """Whether every shard is on disk."""
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
        sha = {name: tensor_digest({name: t}) for name, t in tensors.items()}
        meta = json.dumps({"key": self.key, "shard": k, "sha256": sha}, sort_keys=True)
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
                held = list(f.keys())
                names = held if names is None else list(names)
                missing = [n for n in names if n not in held]
                if missing:
                    raise KeyError(f"{path} has no tensor(s) {missing}; it holds {sorted(held)}")
                tensors = {name: f.get_tensor(name) for name in names}
        except KeyError:
            raise
        except Exception as err:
            raise StoreError(f"{path} is corrupt or truncated ({err}); delete it and run the extraction "
                             f"again to rebuild it") from err
        if meta.get("key") != self.key:
            raise StoreError(f"{path} belongs to another store (key {meta.get('key')!r}, expected {self.key!r})")
        sha = meta.get("sha256") or {}
        bad = [n for n, t in tensors.items() if sha.get(n) != tensor_digest({n: t})]
        if bad:
            raise StoreError(f"{path} is corrupt: tensor(s) {bad} do not match their checksums; delete it and "
                             f"run the extraction again to rebuild it")
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


class StoreDataset(IterableDataset):
    """Streams samples ``{name: tensor}`` from a complete store, one shard in memory at a time.

    Each epoch visits the shards in a seeded order (``shuffle``) and the samples of a shard in a seeded
    order, so memory is one shard of the requested tensors, whatever the store's size. Shards are dealt
    to DataLoader workers and to distributed ranks (each rank gets every ``world_size``-th shard).

    Args:
        store: a :class:`FeatureStore` or its folder.
        names: the tensors to read (features and the labels/masks stored beside them); default all.
        shuffle: shuffle shard order and samples within a shard each epoch.
        seed: base seed of the shuffle. Each pass over the dataset advances its epoch, so every epoch
            gets a new order; with DataLoader workers (which iterate copies) call :meth:`set_epoch`.
        dtype: cast floating-point tensors to this dtype (float16/bfloat16 stores train in float32).
        where: optional ``(name, value)``: only samples whose tensor ``name`` equals ``value`` (e.g.
            ``("split", 0)`` for the training split).

    Raises:
        StoreError: the store is incomplete.
        KeyError: a requested name is not in the store (the valid ones are listed).
    """

    def __init__(self, store: FeatureStore | str | Path, names: Sequence[str] | None = None, shuffle: bool = False,
                 seed: int = 0, dtype: torch.dtype | None = torch.float32,
                 where: tuple[str, int] | None = None) -> None:
        self.store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        missing = self.store.missing_shards()
        if missing:
            raise StoreError(f"{self.store.root} is incomplete ({len(missing)} of {self.store.num_shards} shards "
                             f"missing); run the extraction again to resume")
        held = self.store.names()
        self.names = list(names) if names is not None else held
        unknown = [n for n in [*self.names, *([where[0]] if where else [])] if n not in held]
        if unknown:
            raise KeyError(f"{self.store.root} holds no tensor(s) {unknown}; it holds {held}")
        self.shuffle, self.seed, self.dtype, self.where, self.epoch = shuffle, seed, dtype, where, 0
        self._len: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffle order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.where is None:
            return self.store.num_samples
        if self._len is None:
            name, value = self.where
            self._len = sum(int((self.store.read_shard(k, [name])[name] == value).sum())
                            for k in range(self.store.num_shards))
        return self._len

    def _my_shards(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        order = (torch.randperm(self.store.num_shards, generator=gen).tolist() if self.shuffle
                 else list(range(self.store.num_shards)))
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return order[rank * nw + wid::world * nw]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        read = list(dict.fromkeys([*self.names, *([self.where[0]] if self.where else [])]))
        shards = self._my_shards()
        self.epoch += 1
        for k in shards:
            shard = self.store.read_shard(k, read)
            if self.dtype is not None:
                shard = {n: t.to(self.dtype) if t.is_floating_point() else t for n, t in shard.items()}
            rows = torch.arange(len(self.store.shard_range(k)))
            if self.where is not None:
                rows = (shard[self.where[0]] == self.where[1]).nonzero().flatten()
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + 1_000_003 * (self.epoch - 1) + 7919 * (k + 1))
                rows = rows[torch.randperm(len(rows), generator=gen)]
            for r in rows.tolist():
                # copies, not views: a batch collated from views would keep whole shards alive
                yield {n: shard[n][r].clone() for n in self.names}
