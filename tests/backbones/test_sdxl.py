"""SDXLBackbone against diffusers' own StableDiffusionXLPipeline built from tiny components."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from tiny_text import tiny_vae, write_clip

from difffeat.backbones import SDXLBackbone, UNet2DConditionBackbone, create_backbone, sd_unet_config
from difffeat.backbones.registry import adapter_for
from difffeat.backbones.sdxl import sdxl_unet_config
from difffeat.extract import FeatureExtractor
from difffeat.noise import NoiseSchedule

PROMPTS = ["a photo of a dog", "A blue house,  painting", "", "tree " * 80]
LAYERS = ["conv_in", "down_blocks.1", "mid_block", "up_blocks.0.attentions.0", "up_blocks.1"]
CONFIG = sdxl_unet_config([8, 16], 8, 32, pooled_dim=16, addition_time_embed_dim=8, layers_per_block=1, heads=2)


def _pipe(tmp_path_factory, force_zeros: bool) -> tuple[StableDiffusionXLPipeline, object]:
    parts = tmp_path_factory.mktemp("sdxl_parts")
    te1, tok1 = write_clip(parts, hidden=16, seed=1)
    te2, tok2 = write_clip(parts, hidden=16, projection=16, seed=2, encoder="text_encoder_2", tokenizer="tokenizer_2")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(CONFIG).eval()
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    return _pipe(tmp_path_factory, force_zeros=True)


@pytest.fixture(scope="module")
def sdxl(sdxl_pipe):
    return create_backbone(sdxl_pipe[1])


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_adapter_is_chosen_by_the_config() -> None:
    assert adapter_for("UNet2DConditionModel", CONFIG) is SDXLBackbone
    assert adapter_for("UNet2DConditionModel", sd_unet_config([8, 16], 8, 16)) is UNet2DConditionBackbone
    with pytest.raises(ValueError, match="does not take"):
        UNet2DConditionBackbone.from_config(CONFIG)


def test_prompts_equal_the_pipeline_encode_prompt(sdxl_pipe, sdxl) -> None:
    pipe, _ = sdxl_pipe
    assert type(sdxl) is SDXLBackbone
    ours = sdxl.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (4, 77, 32) and ours["text_embeds"].shape == (4, 16)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(ours["text_embeds"][0], ours["text_embeds"][1])


def test_default_condition_is_the_pipeline_negative(sdxl_pipe, sdxl, tmp_path_factory) -> None:
    pipe, _ = sdxl_pipe
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt("a dog", device="cpu", do_classifier_free_guidance=True)
    assert not negative.any(), "force_zeros_for_empty_prompt: the pipeline's negative is zeros"
    torch.testing.assert_close(sdxl.default_condition["encoder_hidden_states"], negative, rtol=0, atol=0)
    torch.testing.assert_close(sdxl.default_condition["text_embeds"], negative_pooled, rtol=0, atol=0)
    # without force_zeros_for_empty_prompt the pipeline encodes "" with both encoders
    pipe2, folder2 = _pipe(tmp_path_factory, force_zeros=False)
    assert json.loads((folder2 / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False
    encoded = create_backbone(folder2)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe2.encode_prompt("a dog", device="cpu", do_classifier_free_guidance=True)
    assert negative.abs().max() > 0.1
    torch.testing.assert_close(encoded.default_condition["encoder_hidden_states"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoded.default_condition["text_embeds"], negative_pooled, rtol=0, atol=1e-6)


def test_denoise_equals_the_unet_with_the_pipeline_time_ids(sdxl_pipe, sdxl) -> None:
    pipe, _ = sdxl_pipe
    cond = sdxl.encode_prompts(PROMPTS[:2])
    for h, w in [(8, 8), (8, 12)]:  # latents; pixels ×2 (the tiny VAE's factor)
        x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w))
        t = torch.tensor([10, 700])
        time_ids = pipe._get_add_time_ids((2 * h, 2 * w), (0, 0), (2 * h, 2 * w), torch.float32,
                                          text_encoder_projection_dim=16).repeat(2, 1)
        with torch.no_grad():
            theirs = pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                               added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": time_ids}).sample
            ours = sdxl.denoise(x, t, cond)
            wrong_size = pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                                   added_cond_kwargs={"text_embeds": cond["text_embeds"],
                                                      "time_ids": time_ids * 2}).sample
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert not torch.allclose(ours, wrong_size), "time_ids reach the output"


def test_pooled_width_must_fit_the_added_embedding(sdxl) -> None:
    cond = {"encoder_hidden_states": torch.zeros(1, 77, 32), "text_embeds": torch.zeros(1, 8)}
    with pytest.raises(ValueError, match="addition_time_embed_dim 8"):
        sdxl.denoise(torch.zeros(1, 4, 8, 8), torch.tensor([1]), cond)
    with pytest.raises(ValueError, match="projection_dim"):
        SDXLBackbone(sdxl.model, sdxl.schedule, condition=cond)


def test_feature_info_and_early_exit(sdxl) -> None:
    info = sdxl.feature_info
    assert (info["conv_in"].channels, info["conv_in"].stride) == (8, 1)
    assert (info["down_blocks.0"].channels, info["down_blocks.0"].stride) == (8, 2)
    assert (info["mid_block"].channels, info["mid_block"].stride) == (16, 2)
    assert (info["up_blocks.1"].channels, info["up_blocks.1"].stride) == (8, 1)
    images = _images(3)
    fast = FeatureExtractor(sdxl, LAYERS[:3], [20, 600], early_exit=True)(images, prompts=PROMPTS[:3])
    full = FeatureExtractor(sdxl, LAYERS[:3], [20, 600], early_exit=False)(images, prompts=PROMPTS[:3])
    for key in fast:
        torch.testing.assert_close(fast[key], full[key], rtol=0, atol=0)


def test_batch_size_does_not_change_features(sdxl) -> None:
    images = _images(5, seed=1)
    one = FeatureExtractor(sdxl, LAYERS, [30, 500], batch_size=1)(images, prompts=[*PROMPTS, "a cat"])
    whole = FeatureExtractor(sdxl, LAYERS, [30, 500], batch_size=10)(images, prompts=[*PROMPTS, "a cat"])
    for key in one:
        torch.testing.assert_close(one[key], whole[key], rtol=0, atol=0)


def test_pipeline_folder_round_trip(sdxl_pipe, sdxl) -> None:
    pipe, _ = sdxl_pipe
    zeros = {"encoder_hidden_states": torch.zeros(1, 77, 32), "text_embeds": torch.zeros(1, 16)}
    memory = SDXLBackbone(pipe.unet, NoiseSchedule.from_scheduler(pipe.scheduler), vae=pipe.vae, condition=zeros)
    assert sdxl.spec()["weights"] == memory.spec()["weights"] and sdxl.spec()["vae"] == memory.spec()["vae"]
    images = _images(3, seed=2)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:3], device="cpu", do_classifier_free_guidance=False)
    loaded = FeatureExtractor(sdxl, LAYERS, [40])(images, prompts=PROMPTS[:3])
    ours = FeatureExtractor(memory, LAYERS, [40])(images, cond={"encoder_hidden_states": embeds,
                                                                  "text_embeds": pooled})
    default_loaded = FeatureExtractor(sdxl, LAYERS, [40])(images)
    default_memory = FeatureExtractor(memory, LAYERS, [40])(images)
    for key in loaded:
        torch.testing.assert_close(loaded[key], ours[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(default_loaded[key], default_memory[key], rtol=0, atol=0)


def test_cached_null_embedding_without_text_encoders(sdxl_pipe, sdxl, tmp_path) -> None:
    folder = tmp_path / "no_text"
    shutil.copytree(sdxl_pipe[1], folder)
    index = json.loads((folder / "model_index.json").read_text())
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / part)
        index[part] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    cached = sdxl.encode_prompts(["a red car"])
    save_file({k: v.contiguous() for k, v in cached.items()}, str(folder / "null_embedding.safetensors"))
    loaded = create_backbone(folder)
    for key in SDXLBackbone.condition_keys:
        torch.testing.assert_close(loaded.default_condition[key], cached[key], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        loaded.encode_prompts(["a cat"])


def test_image_size_must_fit_the_vae_and_unet(sdxl) -> None:
    ext = FeatureExtractor(sdxl, ["mid_block"], [10])
    with pytest.raises(ValueError, match=r"18x18.*multiples of 4 \(VAE factor 2 × U-Net downsampling 2\)"):
        ext(_images(2, size=18))
    with pytest.raises(ValueError, match="8x7"):
        sdxl.denoise(torch.zeros(1, 4, 8, 7), torch.tensor([1]))
    assert ext(_images(2, size=20))[("mid_block", 10)].shape == (2, 16)  # 20 = 5 × 4 is fine


def test_prompts_as_default_condition_change_the_spec(sdxl_pipe, sdxl) -> None:
    folder = sdxl_pipe[1]
    dog = create_backbone(folder, condition=sdxl.encode_prompts(["a photo of a dog"]))
    cat = create_backbone(folder, condition=sdxl.encode_prompts(["a photo of a cat"]))
    assert dog.spec() != cat.spec() and dog.spec() != sdxl.spec()
    assert dog.spec() == create_backbone(folder, condition=sdxl.encode_prompts(["a photo of a dog"])).spec()
