"""FeatureStore: keys, atomic shards, resume, damage detection, stale temp files; StoreDataset."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from difffeat.store import FeatureStore, StoreError

SPEC = {"backbone": "x", "layers": ["a"], "timesteps": [1], "seed": 0, "dataset": "d"}


def _fill(store: FeatureStore, shards=None) -> None:
    for k in shards if shards is not None else range(store.num_shards):
        idx = torch.tensor(list(store.shard_range(k)))
        store.write_shard(k, {"a@t1": idx[:, None].float().repeat(1, 3), "index": idx})


def test_round_trip_and_shard_ranges(tmp_path) -> None:
    fs = FeatureStore(tmp_path, SPEC, num_samples=10, shard_size=4)
    assert fs.num_shards == 3 and list(fs.shard_range(2)) == [8, 9]
    assert not fs.complete
    _fill(fs)
    assert fs.complete
    data = FeatureStore.open(tmp_path).load()
    assert torch.equal(data["index"], torch.arange(10))
    assert data["a@t1"].shape == (10, 3)
    assert not list(tmp_path.glob(".*tmp*"))


def test_resumed_fill_is_byte_identical(tmp_path) -> None:
    whole = FeatureStore(tmp_path / "whole", SPEC, 10, 4)
    _fill(whole)
    part = FeatureStore(tmp_path / "part", SPEC, 10, 4)
    _fill(part, [1])  # "interrupted" after one shard
    resumed = FeatureStore(tmp_path / "part", SPEC, 10, 4)
    assert resumed.missing_shards() == [0, 2]
    _fill(resumed, resumed.missing_shards())
    for k in range(3):
        assert whole.shard_path(k).read_bytes() == resumed.shard_path(k).read_bytes()
    assert (tmp_path / "whole/manifest.json").read_bytes() == (tmp_path / "part/manifest.json").read_bytes()


def test_store_with_other_settings_is_refused(tmp_path) -> None:
    FeatureStore(tmp_path, SPEC, 10, 4)
    with pytest.raises(StoreError, match=r"other settings.*\['seed'\]"):
        FeatureStore(tmp_path, {**SPEC, "seed": 1}, 10, 4)
    with pytest.raises(StoreError, match="shard_size"):
        FeatureStore(tmp_path, SPEC, 10, 5)


def test_truncated_shard_is_named(tmp_path) -> None:
    fs = FeatureStore(tmp_path, SPEC, 10, 4)
    _fill(fs)
    path = fs.shard_path(1)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(StoreError, match=r"shard_00001\.safetensors is corrupt or truncated"):
        fs.load()


def test_corrupt_shard_fails_its_checksum(tmp_path) -> None:
    fs = FeatureStore(tmp_path, SPEC, 10, 4)
    _fill(fs)
    path = fs.shard_path(2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"shard_00002\.safetensors is corrupt"):
        fs.read_shard(2)


def test_incomplete_store_says_how_many_shards_are_missing(tmp_path) -> None:
    fs = FeatureStore(tmp_path, SPEC, 10, 4)
    _fill(fs, [0])
    with pytest.raises(StoreError, match="2 of 3 shards missing"):
        fs.load()


def test_shard_with_wrong_row_count_is_refused(tmp_path) -> None:
    fs = FeatureStore(tmp_path, SPEC, 10, 4)
    with pytest.raises(ValueError, match=r"shard 0 holds 4 samples.*\(3, 2\)"):
        fs.write_shard(0, {"a@t1": torch.zeros(3, 2)})
    assert not fs.shard_path(0).exists()


# ----------------------------------------------------------------- temporary file names

def test_writer_temp_names_carry_host_and_pid(tmp_path, monkeypatch) -> None:
    from difffeat import store as store_module

    seen = []
    real_replace = os.replace
    monkeypatch.setattr(store_module.os, "replace", lambda src, dst: (seen.append(src), real_replace(src, dst)))
    fs = FeatureStore(tmp_path, SPEC, 10, 4)
    _fill(fs, [0])
    assert seen and all(store_module._TMP.match(p.name) for p in seen)
    assert all(f"-{store_module._HOST}-{os.getpid()}-" in p.name for p in seen)


# ----------------------------------------------------------------- folders that are not stores


@pytest.mark.parametrize("content", ['{"model": "x"}', "[1, 2]", '{"key": "k", "spec": {"seed": 0}}'])
def test_manifest_that_is_not_a_manifest_is_refused(tmp_path, content) -> None:
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(StoreError, match="not a feature-store manifest"):
        FeatureStore.open(tmp_path)


def test_json_that_is_not_a_manifest_is_refused_on_create(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text('{"model": "x"}')
    with pytest.raises(StoreError, match="not a feature-store manifest"):
        FeatureStore(tmp_path, SPEC, 10, 4)




# ----------------------------------------------------------------- per-tensor checksums
def _flip_byte_of(path, name: str) -> None:
    """Flips one byte inside tensor ``name``'s data in a safetensors file."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_reading_some_tensors_checks_those(tmp_path) -> None:
    fs = FeatureStore(tmp_path, SPEC, 10, 4)
    _fill(fs)
    _flip_byte_of(fs.shard_path(1), "a@t1")
    with pytest.raises(StoreError, match=r"shard_00001\.safetensors is corrupt.*'a@t1'"):
        fs.read_shard(1, ["a@t1"])
    with pytest.raises(StoreError, match="corrupt"):
        fs.load(["a@t1"])
    assert torch.equal(fs.read_shard(1, ["index"])["index"], torch.arange(4, 8))  # the intact tensor reads
    _flip_byte_of(fs.shard_path(2), "index")
    with pytest.raises(StoreError, match=r"'index'"):
        fs.read_shard(2, ["index"])


# ----------------------------------------------------------------- StoreDataset
def _labelled(root, n: int = 40, shard_size: int = 8) -> FeatureStore:
    """A complete store of ``n`` samples: feature ``a@t1`` = index, ``split`` = index % 3 == 0."""
    fs = FeatureStore(root, SPEC, n, shard_size)
    for k in range(fs.num_shards):
        idx = torch.tensor(list(fs.shard_range(k)))
        fs.write_shard(k, {"a@t1": idx[:, None].half().repeat(1, 2), "index": idx,
                           "split": (idx % 3 == 0).long()})
    return fs


def _order(ds) -> list[int]:
    return [int(item["index"]) for item in ds]


def test_store_dataset_streams_every_sample_once_in_order(tmp_path) -> None:
    from difffeat.store import StoreDataset

    ds = StoreDataset(_labelled(tmp_path))
    assert len(ds) == 40
    assert _order(ds) == list(range(40)) == _order(ds)  # every epoch
    item = next(iter(ds))
    assert set(item) == {"a@t1", "index", "split"}
    assert item["a@t1"].dtype == torch.float32 and item["index"].dtype == torch.int64  # floats cast, ints kept
    assert torch.equal(item["a@t1"], torch.zeros(2))


def test_store_dataset_shuffles_by_seed_and_epoch(tmp_path) -> None:
    from difffeat.store import StoreDataset

    fs = _labelled(tmp_path)
    ds = StoreDataset(fs, shuffle=True, seed=3)
    ds.set_epoch(0)
    first = _order(ds)
    ds.set_epoch(0)
    assert _order(ds) == first  # seeded
    assert sorted(first) == list(range(40)) and first != list(range(40))
    ds.set_epoch(1)
    second = _order(ds)
    assert sorted(second) == list(range(40)) and second != first
    other = StoreDataset(fs, shuffle=True, seed=3)
    other.set_epoch(1)
    assert _order(other) == second


def test_store_dataset_where_keeps_one_split(tmp_path) -> None:
    from difffeat.store import StoreDataset

    ds = StoreDataset(_labelled(tmp_path), names=["index"], where=("split", 1))
    assert _order(ds) == [i for i in range(40) if i % 3 == 0]
    assert len(ds) == 14
    assert set(next(iter(ds))) == {"index"}


def test_store_dataset_reads_one_shard_at_a_time(tmp_path, monkeypatch) -> None:
    from difffeat.store import StoreDataset

    fs = _labelled(tmp_path)
    reads: list[tuple[int, list[str]]] = []
    real = FeatureStore.read_shard
    monkeypatch.setattr(FeatureStore, "read_shard",
                        lambda self, k, names=None: (reads.append((k, list(names))), real(self, k, names))[1])
    ds = StoreDataset(fs, names=["a@t1"])
    it = iter(ds)
    next(it)
    assert reads == [(0, ["a@t1"])]  # lazily, one shard, only the requested tensors
    for _ in range(8):
        next(it)
    assert [k for k, _ in reads] == [0, 1]
    list(it)
    assert [k for k, _ in reads] == list(range(fs.num_shards))  # once per shard per epoch


def test_store_dataset_refuses_incomplete_store_and_unknown_names(tmp_path) -> None:
    from difffeat.store import StoreDataset

    part = FeatureStore(tmp_path / "part", SPEC, 10, 4)
    _fill(part, [0, 2])
    with pytest.raises(StoreError, match=r"incomplete \(1 of 3 shards missing\)"):
        StoreDataset(part)
    with pytest.raises(KeyError, match=r"'a@t9'.*it holds \['a@t1', 'index', 'split'\]"):
        StoreDataset(_labelled(tmp_path / "whole"), names=["a@t9"])
    with pytest.raises(KeyError, match="labels"):
        StoreDataset(tmp_path / "whole", where=("labels", 0))
