"""PixArtBackbone against diffusers' own PixArtAlphaPipeline / PixArtSigmaPipeline built from tiny components."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from safetensors.torch import save_file
from tiny_text import tiny_vae, write_t5

from difffeat.backbones import PixArtBackbone, create_backbone
from difffeat.backbones.pixart import max_sequence_length, pixart_config
from difffeat.extract import FeatureExtractor
from difffeat.noise import NoiseSchedule

PROMPTS = ["a photo of a dog", "  A Blue HOUSE, painting ", "", "tree " * 140]  # the last exceeds 120 tokens
LAYERS = ["pos_embed", "transformer_blocks.0", "transformer_blocks.2"]


def _pipe(tmp_path_factory, cls: type, additional: bool) -> tuple[object, object]:
    parts = tmp_path_factory.mktemp("pixart_parts")
    text_encoder, tokenizer = write_t5(parts, d_model=32, seed=4)
    # micro-conditions split the width in three (PixArt-α-XL: 1152 = 3 · 384), so 2 heads of 12 there
    config = pixart_config(8, 3, 2, 12 if additional else 8, 32, use_additional_conditions=additional)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel.from_config(config).eval()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(), transformer=transformer,
               scheduler=scheduler)
    folder = tmp_path_factory.mktemp("pixart") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def sigma_pipe(tmp_path_factory):
    return _pipe(tmp_path_factory, PixArtSigmaPipeline, additional=False)


@pytest.fixture(scope="module")
def alpha_pipe(tmp_path_factory):
    return _pipe(tmp_path_factory, PixArtAlphaPipeline, additional=True)


@pytest.fixture(scope="module")
def sigma(sigma_pipe):
    return create_backbone(sigma_pipe[1])


@pytest.fixture(scope="module")
def alpha(alpha_pipe):
    return create_backbone(alpha_pipe[1])


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sequence_length_follows_the_pipeline_class(sigma_pipe, alpha_pipe, sigma, alpha, tmp_path) -> None:
    assert json.loads((sigma_pipe[1] / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    assert (max_sequence_length(sigma_pipe[1]), max_sequence_length(alpha_pipe[1])) == (300, 120)
    assert max_sequence_length(None) == max_sequence_length(tmp_path) == 120
    assert sigma.default_condition["encoder_hidden_states"].shape == (1, 300, 32)
    assert alpha.default_condition["encoder_attention_mask"].shape == (1, 120)
    assert create_backbone(alpha_pipe[1], max_sequence_length=64).encode_prompts(["a"])[
        "encoder_attention_mask"].shape == (1, 64)


@pytest.mark.parametrize("which", ["sigma", "alpha"])
def test_prompts_equal_the_pipeline_encode_prompt(which, request) -> None:
    pipe, _ = request.getfixturevalue(f"{which}_pipe")
    backbone = request.getfixturevalue(which)
    assert type(backbone) is PixArtBackbone
    ours = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                                    device="cpu")
    length = 300 if which == "sigma" else 120
    assert ours["encoder_hidden_states"].shape == (4, length, 32)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    assert torch.equal(ours["encoder_attention_mask"], mask)
    assert mask[3].sum() == min(length, 141) and mask[2].sum() == 1  # truncation; "" is just </s>
    # the default condition is the pipeline's negative (its default negative prompt "")
    torch.testing.assert_close(backbone.default_condition["encoder_hidden_states"], negative[:1], rtol=0, atol=1e-6)
    assert torch.equal(backbone.default_condition["encoder_attention_mask"], negative_mask[:1])


def test_denoise_equals_the_transformer_with_the_pipeline_micro_conditions(alpha_pipe, alpha) -> None:
    pipe, _ = alpha_pipe
    cond = alpha.encode_prompts(PROMPTS[:2])
    for h, w in [(8, 8), (8, 12)]:  # latents; pixels ×2 (the tiny VAE's factor)
        x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w))
        t = torch.tensor([5, 900])
        height, width = 2 * h, 2 * w  # as PixArtAlphaPipeline.__call__ builds them
        kwargs = {"resolution": torch.tensor([height, width]).repeat(2, 1).float(),
                  "aspect_ratio": torch.tensor([float(height / width)]).repeat(2, 1).float()}
        with torch.no_grad():
            theirs = pipe.transformer(x, encoder_hidden_states=cond["encoder_hidden_states"],
                                      encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                                      added_cond_kwargs=kwargs).sample
            ours = alpha.denoise(x, t, cond)
            other = pipe.transformer(x, encoder_hidden_states=cond["encoder_hidden_states"],
                                     encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                                     added_cond_kwargs={k: v * 3 for k, v in kwargs.items()}).sample
        assert ours.shape == (2, 8, h, w), "learned sigma: 2 × 4 channels, ε first"
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert not torch.allclose(ours, other), "the micro-conditions reach the output"


def test_feature_info_early_exit_and_batch_size(sigma) -> None:
    info = sigma.feature_info
    blocks = ["pos_embed", "transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    assert sigma.tap_names() == blocks
    assert [n for n in info if n in blocks] == blocks, "in execution order"
    assert all(info[n].kind == "tokens" and info[n].grid == (4, 4) and info[n].channels == 16 for n in blocks)
    images, prompts = _images(5), [*PROMPTS, "a cat"]
    fast = FeatureExtractor(sigma, LAYERS[:2], [20, 600], early_exit=True)(images, prompts=prompts)
    full = FeatureExtractor(sigma, LAYERS[:2], [20, 600], early_exit=False)(images, prompts=prompts)
    one = FeatureExtractor(sigma, LAYERS, [20, 600], batch_size=1)(images, prompts=prompts)
    whole = FeatureExtractor(sigma, LAYERS, [20, 600], batch_size=10)(images, prompts=prompts)
    for key in fast:
        torch.testing.assert_close(fast[key], full[key], rtol=0, atol=0)
    for key in one:
        torch.testing.assert_close(one[key], whole[key], rtol=0, atol=0)
    assert not torch.allclose(one[("transformer_blocks.2", 600)][0], one[("transformer_blocks.2", 600)][1])


@pytest.mark.parametrize("which", ["sigma", "alpha"])
def test_pipeline_folder_round_trip(which, request) -> None:
    pipe, _ = request.getfixturevalue(f"{which}_pipe")
    backbone = request.getfixturevalue(which)
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS[:3], device="cpu")
    memory = PixArtBackbone(pipe.transformer, NoiseSchedule.from_scheduler(pipe.scheduler), vae=pipe.vae,
                            condition={"encoder_hidden_states": negative[:1],
                                       "encoder_attention_mask": negative_mask[:1]},
                            max_sequence_length=embeds.shape[1])
    assert memory.spec() == {**backbone.spec(), "condition": memory.spec()["condition"]}
    images = _images(3, seed=2)
    loaded = FeatureExtractor(backbone, LAYERS, [40])(images, prompts=PROMPTS[:3])
    ours = FeatureExtractor(memory, LAYERS, [40])(images, cond={"encoder_hidden_states": embeds,
                                                                  "encoder_attention_mask": mask})
    default_loaded = FeatureExtractor(backbone, LAYERS, [40])(images)
    default_memory = FeatureExtractor(memory, LAYERS, [40])(images)
    for key in loaded:
        torch.testing.assert_close(loaded[key], ours[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(default_loaded[key], default_memory[key], rtol=0, atol=1e-6)


def test_cached_null_embedding_without_text_encoder(sigma_pipe, sigma, tmp_path) -> None:
    folder = tmp_path / "no_text"
    shutil.copytree(sigma_pipe[1], folder)
    index = json.loads((folder / "model_index.json").read_text())
    for part in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / part)
        index[part] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    cached = sigma.encode_prompts(["a red car"])
    save_file({k: v.contiguous() for k, v in cached.items()}, str(folder / "null_embedding.safetensors"))
    loaded = create_backbone(folder)
    for key in PixArtBackbone.condition_keys:
        assert torch.equal(loaded.default_condition[key], cached[key])
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoise(x, torch.tensor([3, 3])), sigma.denoise(x, torch.tensor([3, 3]),
                                                                                             cached), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        loaded.encode_prompts(["a cat"])


def test_prompts_as_default_condition_change_the_spec(sigma_pipe, sigma) -> None:
    folder = sigma_pipe[1]
    dog = create_backbone(folder, condition=sigma.encode_prompts(["a photo of a dog"]))
    cat = create_backbone(folder, condition=sigma.encode_prompts(["a photo of a cat"]))
    assert dog.spec() != cat.spec() and dog.spec() != sigma.spec()
    assert dog.spec() == create_backbone(folder, condition=sigma.encode_prompts(["a photo of a dog"])).spec()
