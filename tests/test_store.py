"""FeatureStore: keys, atomic shards, resume, damage detection."""

from __future__ import annotations

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
