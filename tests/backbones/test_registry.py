"""The registry, the adapters' feature_info, and loading from local diffusers folders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from safetensors.torch import save_file

from difffeat.backbones import Backbone, create_backbone, list_backbones
from difffeat.backbones.registry import resolve_local

TINY = ["unet2d-tiny", "sd-unet-tiny", "dit-tiny"]


def _probe(backbone: Backbone, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    size = backbone.latent_size
    x = torch.randn(2, backbone.latent_channels, size, size, generator=gen)
    with torch.no_grad():
        return backbone.denoise(x, torch.tensor([3, 500]))


@pytest.mark.parametrize("name", list_backbones())
def test_feature_info_matches_the_taps(name: str) -> None:
    backbone = create_backbone(name)
    info = backbone.feature_info
    assert info, "every adapter offers taps"
    assert [i.order for i in info.values()] == sorted(i.order for i in info.values())
    deepest = [n for n in info if n.count(".") <= 1][-3:]
    size = backbone.latent_size
    x = torch.randn(1, backbone.latent_channels, size, size)
    with torch.no_grad(), backbone.tap(deepest, stop_early=False) as found:
        backbone.run(x, torch.tensor([1]))
    for n in deepest:
        out = found[n]
        if info[n].kind == "map":
            assert out.shape[1] == info[n].channels
            assert out.shape[-1] * info[n].stride == size
        else:
            assert out.shape[-1] == info[n].channels
            assert out.shape[1] == info[n].grid[0] * info[n].grid[1]


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_round_trip(name: str, tmp_path) -> None:
    backbone = create_backbone(name)
    backbone.model.save_pretrained(tmp_path / "model")
    loaded = create_backbone(tmp_path / "model")
    assert type(loaded) is type(backbone)
    torch.testing.assert_close(_probe(loaded), _probe(backbone), rtol=0, atol=0)


def test_pipeline_folder_loads_scheduler_and_vae(tmp_path) -> None:
    backbone = create_backbone("sd-unet-tiny")
    folder = tmp_path / "pipe"
    backbone.model.save_pretrained(folder / "unet")
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=500)
    sched.save_pretrained(folder / "scheduler")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    null = torch.randn(1, 5, 16)
    save_file({"prompt_embeds": null}, str(folder / "null_embedding.safetensors"))
    loaded = create_backbone(folder)
    assert torch.equal(loaded.encoder_hidden_states, null)
    assert loaded.schedule.num_train_timesteps == 500
    assert loaded.image_channels == 3 and loaded.image_size == 16
    latents = loaded.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert latents.shape == (2, 4, 8, 8)


def test_dit_null_class_is_the_last_embedding() -> None:
    backbone = create_backbone("dit-tiny")
    assert isinstance(backbone.model, DiTTransformer2DModel)
    assert backbone.class_label == backbone.null_class == 10
    table = backbone.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11  # 10 classes + the null class learned through label dropout


def test_hub_id_without_local_copy_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="someone/not-cached-model.*never downloads"):
        resolve_local("someone/not-cached-model")


def test_unknown_layer_lists_valid_names() -> None:
    backbone = create_backbone("unet2d-tiny")
    with pytest.raises(KeyError, match=r"up_blocks\.7.*valid layers.*mid_block"):
        backbone.modules_by_name(["up_blocks.7"])


def test_folder_without_diffusers_config_is_rejected(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        create_backbone(tmp_path)
