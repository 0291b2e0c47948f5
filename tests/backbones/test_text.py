"""Prompt encoding through a pipeline's own text encoders: SD-1/2 against StableDiffusionPipeline.encode_prompt.

The pipeline folder is written by diffusers' own ``save_pretrained`` from tiny components (CLIP from
``tiny_text``), so the folder layout, ``model_index.json`` and tokenizer files are the real ones.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tiny_text import tiny_vae, write_clip

from difffeat.backbones import UNet2DConditionBackbone, create_backbone, sd_unet_config
from difffeat.extract import FeatureExtractor

PROMPTS = ["a photo of a dog", "A RED car,  by the tree!", "", "zebra " * 90]  # the last one is truncated
LAYERS = ["down_blocks.0", "mid_block", "up_blocks.1"]


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    parts = tmp_path_factory.mktemp("sd_parts")
    text_encoder, tokenizer = write_clip(parts, hidden=16, seed=3)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sd_unet_config([8, 16], 8, 16, layers_per_block=1, heads=2)).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def sd(sd_pipe):
    return create_backbone(sd_pipe[1])


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sd_prompts_equal_the_pipeline_encode_prompt(sd_pipe, sd) -> None:
    pipe, _ = sd_pipe
    assert type(sd) is UNet2DConditionBackbone
    ours = sd.encode_prompts(PROMPTS)["encoder_hidden_states"]
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert ours.shape == (len(PROMPTS), 77, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0], ours[1]), "different prompts, different embeddings"


def test_sd_default_condition_is_the_encoded_empty_prompt(sd_pipe, sd) -> None:
    pipe, _ = sd_pipe
    with torch.no_grad():
        _, negative = pipe.encode_prompt(["a photo of a dog"], "cpu", 1, True)  # no negative prompt: ""
    torch.testing.assert_close(sd.default_condition["encoder_hidden_states"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd.default_condition["encoder_hidden_states"],
                               sd.encode_prompts([""])["encoder_hidden_states"], rtol=0, atol=0)


def test_per_image_prompts_equal_one_prompt_at_a_time(sd) -> None:
    # The same image batch each time: the VAE's conv kernels round differently for a batch of 1 and of 3
    # (measured up to 9e-8 on the latents), so one-image calls would test the VAE, not the prompt routing.
    ext = FeatureExtractor(sd, LAYERS, [50, 400], batch_size=4)
    images, prompts = _images(3), PROMPTS[:3]
    together = ext(images, indices=[0, 1, 2], prompts=prompts)
    unconditional = ext(images, indices=[0, 1, 2])
    for i, prompt in enumerate(prompts):
        alone = ext(images, indices=[0, 1, 2], prompts=[prompt] * 3)
        for key, value in together.items():
            torch.testing.assert_close(value[i], alone[key][i], rtol=0, atol=0)
    key = ("mid_block", 400)
    assert not torch.allclose(together[key][0], unconditional[key][0]), "a prompt changes the features"
    torch.testing.assert_close(together[key][2], unconditional[key][2], rtol=0, atol=0)  # "" is the default


def test_prompt_list_of_the_wrong_length_is_refused(sd) -> None:
    ext = FeatureExtractor(sd, ["mid_block"], [10])
    with pytest.raises(ValueError, match=r"2 prompts for a batch of 3 images"):
        ext(_images(3), prompts=PROMPTS[:2])


def test_text_encoder_without_tokenizer_names_the_tokenizer(sd_pipe, tmp_path) -> None:
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(sd_pipe[1], folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        create_backbone(folder)


def test_cached_null_embedding_without_text_encoder(sd_pipe, sd, tmp_path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "no_text"
    shutil.copytree(sd_pipe[1], folder)
    for part in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / part)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    cached = sd.encode_prompts(["a photo of a dog"])
    save_file({k: v.contiguous() for k, v in cached.items()}, str(folder / "null_embedding.safetensors"))
    loaded = create_backbone(folder)
    torch.testing.assert_close(loaded.default_condition["encoder_hidden_states"], cached["encoder_hidden_states"],
                               rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        loaded.encode_prompts(["a cat"])


def test_prompts_as_default_condition_change_the_spec(sd_pipe, sd) -> None:
    folder = sd_pipe[1]
    dog = create_backbone(folder, condition=sd.encode_prompts(["a photo of a dog"]))
    cat = create_backbone(folder, condition=sd.encode_prompts(["a photo of a cat"]))
    dog_again = create_backbone(folder, condition=sd.encode_prompts(["a photo of a dog"]))
    assert dog.spec() != cat.spec()
    assert dog.spec()["condition"] != sd.spec()["condition"]
    assert dog.spec() == dog_again.spec()


def test_a_prompt_condition_does_not_depend_on_the_prompts_beside_it(sd_pipe) -> None:
    backbone = create_backbone(sd_pipe[1])
    prompts = ["a photo of a dog", "a cat", "a photo of a dog", "", "a red square on grass"]
    calls: list[int] = []
    together = backbone.encode_prompts(prompts)["encoder_hidden_states"]
    encoder = backbone._prompt_encoder
    backbone._prompt_encoder = lambda batch: (calls.append(len(batch)), encoder(batch))[1]
    backbone._prompt_cache.clear()
    again = backbone.encode_prompts(prompts)["encoder_hidden_states"]
    assert calls == [1, 1, 1, 1]  # one call per distinct prompt
    assert torch.equal(again, together)
    for i, prompt in enumerate(prompts):
        alone = create_backbone(sd_pipe[1]).encode_prompts([prompt])["encoder_hidden_states"]
        assert torch.equal(alone[0], together[i])
    with pytest.raises(ValueError, match="at least one prompt"):
        backbone.encode_prompts([])
