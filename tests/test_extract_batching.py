"""Forward batches apart from shards, bytes independent of batch_size, and bad input refused up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difffeat.backbones import create_backbone
from difffeat.data import DigitsDataset
from difffeat.extract import CPU_ROWS, FeatureExtractor
from difffeat.predict import ExtractionModule, extract_to_store

QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
BACKBONES = {"unet2d-tiny": ["down_blocks.1", "up_blocks.0"], "sd-unet-tiny": ["down_blocks.1", "up_blocks.1"],
             "dit-tiny": ["transformer_blocks.2"]}


class _Subset(DigitsDataset):
    """The first 40 test digits."""

    def __init__(self) -> None:
        super().__init__("test")
        self.images, self.labels = self.images[:40], self.labels[:40]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_features_do_not_depend_on_batch_size(name) -> None:
    backbone = create_backbone(name, seed=0)
    x = torch.rand(37, backbone.image_channels, backbone.image_size, backbone.image_size) * 2 - 1
    runs = [FeatureExtractor(backbone, BACKBONES[name], [10, 200, 500], batch_size=bs)(x, range(37))
            for bs in (1, 8, 33, 64, 37 * 3)]
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def _forward_rows(batch_size: int, pad_rows: bool = True) -> list[int]:
    backbone = create_backbone("unet2d-tiny")
    fe = FeatureExtractor(backbone, ["up_blocks.0"], [10, 200, 500], batch_size=batch_size, pad_rows=pad_rows)
    seen: list[int] = []
    handle = backbone.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        fe(torch.zeros(64, 1, 16, 16))
    finally:
        handle.remove()
    return seen


def test_a_forward_never_exceeds_batch_size_rows_on_an_accelerator(monkeypatch) -> None:
    import difffeat.extract

    monkeypatch.setattr(difffeat.extract, "_fixed_rows", lambda device: None)  # the accelerator path
    assert _forward_rows(40) == [40] * 4 + [32]  # 64 images x 3 timesteps = 192 rows


def test_every_cpu_forward_has_the_fixed_row_count() -> None:
    assert _forward_rows(40) == _forward_rows(1000) == [CPU_ROWS] * 6  # 192 rows, never one forward of 192


def test_pad_rows_off_runs_batch_size_rows_on_the_cpu_and_agrees_to_rounding() -> None:
    assert _forward_rows(40, pad_rows=False) == [40] * 4 + [32]  # as on an accelerator: no 32-row padding
    backbone = create_backbone("unet2d-tiny", seed=0)
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    padded = FeatureExtractor(backbone, ["up_blocks.0"], [10, 500])(x, range(5))
    unpadded = FeatureExtractor(backbone, ["up_blocks.0"], [10, 500], batch_size=3, pad_rows=False)(x, range(5))
    for key in padded:
        torch.testing.assert_close(unpadded[key], padded[key], rtol=1e-5, atol=1e-6)


def test_store_bytes_do_not_depend_on_batch_size(tmp_path) -> None:
    stores = {bs: extract_to_store(ExtractionModule("unet2d-tiny", ["mid_block", "up_blocks.0"], [10, 200],
                                                    batch_size=bs), _Subset(), tmp_path / str(bs), shard_size=16,
                                   trainer=QUIET) for bs in (1, 8, 32)}
    ref = stores[32]
    for store in stores.values():
        assert [store.shard_path(k).read_bytes() for k in range(3)] == [ref.shard_path(k).read_bytes()
                                                                        for k in range(3)]
    # the key does not hold batch_size (a resumed fill may use another one)
    assert stores[1].key == ref.key


def test_float16_store_holds_float16_features_and_another_key(tmp_path) -> None:
    half = extract_to_store(ExtractionModule("unet2d-tiny", ["mid_block"], [10], store_dtype="float16"),
                            _Subset(), tmp_path / "half", shard_size=16, trainer=QUIET)
    full = extract_to_store(ExtractionModule("unet2d-tiny", ["mid_block"], [10]), _Subset(), tmp_path / "full",
                            shard_size=16, trainer=QUIET)
    a, b = half.load(), full.load()
    assert a["mid_block@t10"].dtype == torch.float16 and a["index"].dtype == torch.int64
    assert torch.equal(a["mid_block@t10"], b["mid_block@t10"].half()) and half.key != full.key


@pytest.fixture(scope="module")
def unet():
    return create_backbone("unet2d-tiny")


@pytest.mark.parametrize(("images", "error", "message"), [
    (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), TypeError, r"uint8.*input_range=\(0, 255\)"),
    (torch.full((2, 1, 16, 16), 200.0), ValueError, r"values in \[200, 200\].*input_range=\(0, 255\)"),
    (np.zeros((2, 1, 16, 16), np.float32), TypeError, "got ndarray"),
    (torch.zeros(2, 16, 16, 1), ValueError, "channels-last.*permute"),
    (torch.zeros(0, 1, 16, 16), ValueError, "empty batch"),
])
def test_bad_images_are_refused_before_any_work(unet, images, error, message) -> None:
    extractor = FeatureExtractor(unet, ["mid_block"], [10])  # probes feature_info once
    calls: list[int] = []
    handle = unet.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            extractor(images)
    finally:
        handle.remove()
    assert not calls


def test_input_range_maps_images_onto_minus_one_one(unet) -> None:
    raw = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    mapped = FeatureExtractor(unet, ["mid_block"], [10], input_range=(0, 255))(raw)
    direct = FeatureExtractor(unet, ["mid_block"], [10])(raw.float() * (2 / 255) - 1)
    assert torch.equal(mapped[("mid_block", 10)], direct[("mid_block", 10)])


def test_latents_have_no_range() -> None:
    dit = create_backbone("dit-tiny")
    assert dit.inputs == "latents"
    FeatureExtractor(dit, ["pos_embed"], [10])(torch.randn(2, 4, 8, 8) * 5)


def test_content_noise_follows_the_image_and_index_noise_the_index(unet) -> None:
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    content = FeatureExtractor(unet, ["mid_block"], [500], noise="content")
    index = FeatureExtractor(unet, ["mid_block"], [500])
    key = ("mid_block", 500)
    assert torch.equal(content(x, [0, 1, 2])[key][2], content(x[2:], [7])[key][0])
    assert not torch.equal(index(x, [0, 1, 2])[key][2], index(x[2:], [7])[key][0])


def test_without_fixed_rows_batch_sizes_agree_to_rounding(monkeypatch) -> None:
    """The accelerator path (no padding, ``batch_size`` rows per forward) agrees to float rounding."""
    import difffeat.extract

    monkeypatch.setattr(difffeat.extract, "_fixed_rows", lambda device: None)
    backbone = create_backbone("unet2d-tiny", seed=0)
    x = torch.rand(13, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = [FeatureExtractor(backbone, BACKBONES["unet2d-tiny"], [10, 500], batch_size=bs)(x, range(13))
            for bs in (1, 8, 26)]
    for other in runs[1:]:
        for key in runs[0]:
            torch.testing.assert_close(other[key], runs[0][key], rtol=1e-5, atol=1e-6)


def test_an_image_latent_does_not_depend_on_the_images_beside_it() -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, layers_per_block=1).eval()
    backbone = create_backbone("sd-unet-tiny", vae=vae, encoder_hidden_states=torch.zeros(1, 1, 16))
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fe = FeatureExtractor(backbone, ["mid_block"], [100])
    together = fe(x, range(5))[("mid_block", 100)]
    for i in (0, 3):
        assert torch.equal(fe(x[i:i + 1], [i])[("mid_block", 100)][0], together[i])
    bad = x.clone()
    bad[4] *= 300  # a [0, 255]-range image last in the batch: refused before any image is encoded
    calls: list[int] = []
    handle = vae.encoder.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        with pytest.raises(ValueError, match="input_range"):
            fe(bad, range(5))
    finally:
        handle.remove()
    assert calls == []
