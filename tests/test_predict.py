"""Extraction through Lightning predict: store contents, resume after interruption, DDP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from difffeat.data import DigitsDataset
from difffeat.extract import FeatureExtractor
from difffeat.predict import ExtractionModule, extract_to_store
from difffeat.store import FeatureStore, StoreError

LAYERS, TIMESTEPS = ["down_blocks.1", "up_blocks.0"], [10, 200]
QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


class _Subset(DigitsDataset):
    """The first 40 test digits (a small dataset with a fingerprint)."""

    def __init__(self) -> None:
        super().__init__("test")
        self.images, self.labels = self.images[:40], self.labels[:40]


class _StopAfter(Callback):
    def __init__(self, n: int) -> None:
        self.n = n

    def on_predict_batch_end(self, trainer, *args) -> None:
        if trainer.predict_loop.batch_progress.current.completed >= self.n:
            raise KeyboardInterrupt  # what a user's Ctrl-C does mid-run


@pytest.fixture(scope="module")
def module() -> ExtractionModule:
    return ExtractionModule("unet2d-tiny", LAYERS, TIMESTEPS)


def test_store_holds_the_extractor_features(module, tmp_path) -> None:
    data = _Subset()
    fs = extract_to_store(module, data, tmp_path, shard_size=16, trainer=QUIET)
    assert fs.complete and fs.num_shards == 3
    stored = fs.load()
    direct = FeatureExtractor(module.extractor.backbone, LAYERS, TIMESTEPS)(data.images[16:32], range(16, 32))
    assert torch.equal(stored["up_blocks.0@t200"][16:32], direct[("up_blocks.0", 200)])
    assert torch.equal(stored["label"], data.labels)


def test_interrupted_extraction_resumes_byte_identical(module, tmp_path) -> None:
    data = _Subset()
    whole = extract_to_store(module, data, tmp_path / "whole", shard_size=16, trainer=QUIET)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        extract_to_store(module, data, tmp_path / "part", shard_size=16,
                         trainer={**QUIET, "callbacks": [_StopAfter(1)]})
    part = FeatureStore.open(tmp_path / "part")
    assert 0 < len(part.missing_shards()) < part.num_shards
    with pytest.raises(StoreError, match="incomplete"):
        part.load()
    resumed = extract_to_store(module, data, tmp_path / "part", shard_size=16, trainer=QUIET)
    assert resumed.complete
    for k in range(whole.num_shards):
        assert whole.shard_path(k).read_bytes() == resumed.shard_path(k).read_bytes()


def test_other_settings_refuse_an_existing_store(module, tmp_path) -> None:
    extract_to_store(module, _Subset(), tmp_path, shard_size=16, trainer=QUIET)
    other = ExtractionModule("unet2d-tiny", LAYERS, TIMESTEPS, seed=1)
    with pytest.raises(StoreError, match=r"other settings.*seed"):
        extract_to_store(other, _Subset(), tmp_path, shard_size=16, trainer=QUIET)


def test_ddp_two_cpu_processes_write_the_same_store(tmp_path) -> None:
    """`difffeat extract` under DDP (2 processes, gloo) gives the single-process bytes."""

    def run(store, *extra):
        cmd = [sys.executable, "-m", "difffeat.cli", "extract", "--model.backbone", "unet2d-tiny",
               "--model.layers", '["mid_block"]', "--model.timesteps", "[10, 300]",
               "--data", "difffeat.data.DigitsDataModule", "--data.predict_split", "test",
               "--store", str(store), "--shard_size", "128", "--trainer",
               '{"accelerator": "cpu", "enable_progress_bar": false, ' + ", ".join(extra) + "}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run(tmp_path / "one", '"devices": 1')
    run(tmp_path / "two", '"devices": 2', '"strategy": "ddp"', '"num_nodes": 1')
    one, two = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    assert one.complete and two.complete and one.num_shards == 5
    for k in range(one.num_shards):
        assert one.shard_path(k).read_bytes() == two.shard_path(k).read_bytes()
