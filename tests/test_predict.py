"""Extraction through Lightning predict: store contents, resume after interruption, DDP."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from difffeat.data import DigitsDataset, load_digits_split
from difffeat.extract import FeatureExtractor
from difffeat.predict import ExtractionModule, extract_to_store
from difffeat.selfcond import SelfConditioning
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


# ----------------------------------------------------------------- the store key is complete
class _Tensors(Dataset):
    """Items ``{"image", "index"}`` over a fixed tensor, fingerprinted by its bytes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.images.numpy().tobytes()).hexdigest()


def _seeded(fn, seed: int = 0):
    """``fn()`` under a fixed torch seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _vae(scaling_factor: float) -> AutoencoderKL:
    """A one-level AutoencoderKL (3 → 4 channels, no downsampling), the same weights for every scaling."""
    config = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8],
              "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
              "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 8, "scaling_factor": scaling_factor}
    return _seeded(lambda: AutoencoderKL.from_config(config))


def _digits(n: int = 4) -> torch.Tensor:
    return load_digits_split("test", 16)[0][:n]


def _latents(n: int = 4, channels: int = 4, lo: float = -3.0, hi: float = 3.0) -> torch.Tensor:
    return torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(0)) * (hi - lo) + lo


def _module(name: str, layers: list[str], **backbone_kwargs) -> ExtractionModule:
    return ExtractionModule(name, layers, [10, 300], backbone_kwargs=backbone_kwargs or None)


def _with_selfcond(module: ExtractionModule) -> ExtractionModule:
    sc = SelfConditioning(hidden=8)
    _seeded(lambda: module.extractor.backbone.set_self_conditioning(sc))
    _seeded(lambda: torch.nn.init.normal_(sc.mlp[-1].weight))  # a trained (non-zero) one changes features
    return module


def _in_float64(module: ExtractionModule) -> ExtractionModule:
    module.extractor = FeatureExtractor(module.extractor.backbone, module.extractor.layers,
                                        module.extractor.timesteps, dtype=torch.float64)
    return module


#: case → (build the reference module, build the one differing in one setting, inputs, differing fields)
KEY_CASES = {
    "text condition": (lambda: _module("sd-unet-tiny", ["mid_block"], encoder_hidden_states=torch.zeros(1, 4, 16)),
                       lambda: _module("sd-unet-tiny", ["mid_block"],
                                       encoder_hidden_states=torch.full((1, 4, 16), 0.5)),
                       _latents, ["backbone.condition.encoder_hidden_states"]),
    "class label": (lambda: _module("dit-tiny", ["transformer_blocks.1"]),
                    lambda: _module("dit-tiny", ["transformer_blocks.1"], class_label=3),
                    _latents, ["backbone.condition.class_label"]),
    "schedule": (lambda: _module("unet2d-tiny", ["mid_block"]),
                 lambda: _module("unet2d-tiny", ["mid_block"], scheduler={"beta_schedule": "squaredcos_cap_v2"}),
                 _digits, ["backbone.schedule.alphas_cumprod"]),
    "vae scaling": (lambda: _module("sd-unet-tiny", ["mid_block"], vae=_vae(0.18215)),
                    lambda: _module("sd-unet-tiny", ["mid_block"], vae=_vae(0.5)),
                    lambda: _latents(channels=3, lo=-1, hi=1), ["backbone.vae.scaling_factor"]),
    "self-conditioning": (lambda: _module("unet2d-tiny", ["up_blocks.1"]),
                          lambda: _with_selfcond(_module("unet2d-tiny", ["up_blocks.1"])),
                          _digits, ["backbone.plugins.selfcond"]),
    "dtype": (lambda: _module("unet2d-tiny", ["mid_block"]),
              lambda: _in_float64(_module("unet2d-tiny", ["mid_block"])),
              _digits, ["backbone.dtype", "backbone.weights"]),  # the weights' bytes change with their dtype
}


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_a_store_made_with_another_setting_is_refused_naming_it(case, tmp_path) -> None:
    build, build_other, inputs, fields = KEY_CASES[case]
    data = _Tensors(inputs())
    first = build()
    extract_to_store(first, data, tmp_path, shard_size=4, trainer=QUIET)
    other = build_other()
    listed = ", ".join(repr(f) for f in fields)
    with pytest.raises(StoreError, match=rf"other settings \(differing: \[{re.escape(listed)}\]\)"):
        extract_to_store(other, data, tmp_path, shard_size=4, trainer=QUIET)
    assert first.extractor.spec() != other.extractor.spec()
    # no false refusal: the same settings rebuilt give the same key and reuse the store as it is
    stored = FeatureStore.open(tmp_path).shard_path(0).read_bytes()
    again = build()
    assert again.spec() == first.spec()
    assert extract_to_store(again, data, tmp_path, shard_size=4, trainer=QUIET).complete
    assert FeatureStore.open(tmp_path).shard_path(0).read_bytes() == stored


@pytest.mark.parametrize("case", ["self-conditioning", "dtype"])
def test_the_keyed_setting_does_change_the_features(case) -> None:
    build, build_other, inputs, _ = KEY_CASES[case]
    x = inputs()
    a, b = build().extractor(x, range(len(x))), build_other().extractor(x, range(len(x)))
    assert any(not torch.equal(a[k], b[k]) for k in a)

