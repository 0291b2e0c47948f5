"""SD3Backbone against diffusers' own StableDiffusion3Pipeline built from tiny components (SD3 and SD3.5 configs)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tiny_text import tiny_vae, write_clip, write_t5

from difffeat.backbones import SD3Backbone, create_backbone
from difffeat.backbones.sd3 import sd3_config
from difffeat.extract import FeatureExtractor
from difffeat.noise import FlowSchedule, NoiseSchedule
from difffeat.readout import Readout

PROMPTS = ["a photo of a dog", "A Blue HOUSE, painting", "", "tree " * 100]  # the last exceeds CLIP's 77 tokens
LAYERS = ["pos_embed", "transformer_blocks.0.text", "transformer_blocks.0"]
#: SD3-medium's VAE scaling
SHIFT, SCALE = 0.0609, 1.5035
#: CLIP widths 32 + 48 = 80 < T5's 96 (the zero padding is exercised); pooled 16 + 24
JOINT, POOLED = 96, 40


class Raw(Readout):
    """The tap output unchanged (tokens stay tokens), so whole activations are compared."""

    def forward(self, x: torch.Tensor, info) -> torch.Tensor:
        return x


def _vae():
    vae = tiny_vae(latent_channels=4, seed=5)
    vae.register_to_config(shift_factor=SHIFT, scaling_factor=SCALE)
    return vae


def _pipe(tmp_path_factory, t5: bool, **extra) -> tuple[StableDiffusion3Pipeline, object]:
    parts = tmp_path_factory.mktemp("sd3_parts")
    te, tok = write_clip(parts, hidden=32, projection=16, seed=1)
    te2, tok2 = write_clip(parts, hidden=48, projection=24, seed=2, encoder="text_encoder_2", tokenizer="tokenizer_2")
    te3, tok3 = (write_t5(parts, d_model=JOINT, seed=3, encoder="text_encoder_3", tokenizer="tokenizer_3")
                 if t5 else (None, None))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel.from_config(
            sd3_config(8, 2, 2, 8, JOINT, POOLED, in_channels=4, pos_embed_max_size=16, **extra)).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(), text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                                    tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def t5_pipe(tmp_path_factory):
    return _pipe(tmp_path_factory, t5=True)


@pytest.fixture(scope="module")
def clip_pipe(tmp_path_factory):
    return _pipe(tmp_path_factory, t5=False)


@pytest.fixture(scope="module")
def sd3(t5_pipe):
    return create_backbone(t5_pipe[1])


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("which", ["t5_pipe", "clip_pipe"])
def test_prompts_equal_the_pipeline_encode_prompt(which, request) -> None:
    pipe, folder = request.getfixturevalue(which)
    backbone = request.getfixturevalue("sd3") if which == "t5_pipe" else create_backbone(folder)
    assert type(backbone) is SD3Backbone
    ours = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
    assert ours["encoder_hidden_states"].shape == (4, 77 + 256, JOINT)
    assert ours["pooled_projections"].shape == (4, POOLED)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=1e-6)
    clip_part, t5_part = ours["encoder_hidden_states"][:, :77], ours["encoder_hidden_states"][:, 77:]
    assert clip_part[..., 80:].abs().max() == 0 and clip_part[..., 79].abs().max() > 0  # CLIPs zero-padded to 96
    assert (t5_part.abs().max() > 0) == (which == "t5_pipe"), "T5 zeros exactly where the folder has no T5"
    assert not torch.allclose(ours["encoder_hidden_states"][0], ours["encoder_hidden_states"][1])
    # the default condition is the pipeline's negative (its default negative prompt "")
    torch.testing.assert_close(backbone.default_condition["encoder_hidden_states"], negative[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(backbone.default_condition["pooled_projections"], negative_pooled[:1],
                               rtol=0, atol=1e-6)


def test_max_sequence_length(t5_pipe) -> None:
    pipe, folder = t5_pipe
    short = create_backbone(folder, max_sequence_length=16)
    assert short.default_condition["encoder_hidden_states"].shape == (1, 77 + 16, JOINT)
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPTS, None, None, device="cpu", max_sequence_length=16)[0]
    torch.testing.assert_close(short.encode_prompts(PROMPTS)["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    assert short.spec()["condition"] != create_backbone(folder).spec()["condition"]


def test_denoise_equals_one_transformer_call_at_the_pipeline_timestep(t5_pipe, sd3) -> None:
    pipe, _ = t5_pipe
    assert isinstance(sd3.schedule, FlowSchedule) and sd3.schedule.shift == 3.0
    t = torch.tensor([900, 5])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=(t / 1000).tolist())  # the pipeline's timesteps at these noise levels
    torch.testing.assert_close(sd3.schedule.model_timesteps(t), scheduler.timesteps, rtol=1e-6, atol=0)
    cond = sd3.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=x, timestep=scheduler.timesteps,
                                  encoder_hidden_states=cond["encoder_hidden_states"],
                                  pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        ours = sd3.denoise(x, scheduler.timesteps, cond)
        default = sd3.denoise(x, scheduler.timesteps)
    assert ours.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(default, ours), "the prompt reaches the output"
    # through the extractor the transformer receives sigma * 1000 (what the pipeline passes as timestep)
    seen = []
    handle = sd3.model.time_text_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        extractor = FeatureExtractor(sd3, ["transformer_blocks.0"], [900])  # (probes feature_info first)
        seen.clear()
        extractor(_images(1))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[-1], scheduler.timesteps[:1].expand(len(seen[-1])), rtol=1e-6, atol=0)


def test_encode_applies_the_vae_shift_factor(sd3) -> None:
    images = _images(2)
    with torch.no_grad():
        mode = sd3.vae.encode(images).latent_dist.mode()
        ours = sd3.encode(images)
    assert sd3.vae.config.shift_factor == SHIFT and sd3.vae.config.scaling_factor == SCALE
    torch.testing.assert_close(ours, (mode - SHIFT) * SCALE, rtol=0, atol=0)  # StableDiffusion3Img2ImgPipeline
    assert (ours - mode * SCALE).abs().min() > 0.09, "the shift is not ignored"
    assert sd3.spec()["vae"]["shift_factor"] == SHIFT


def test_feature_info_and_text_stream_taps(sd3) -> None:
    info = sd3.feature_info
    assert sd3.tap_names() == ["pos_embed", "transformer_blocks.0", "transformer_blocks.1"]
    plain = [n for n in info if ".attn" not in n]
    assert plain == ["pos_embed", "transformer_blocks.0", "transformer_blocks.0.text", "transformer_blocks.1"]
    assert [i.order for i in info.values()] == list(range(len(info)))
    for name in ("pos_embed", "transformer_blocks.0", "transformer_blocks.1"):
        assert (info[name].kind, info[name].grid, info[name].channels) == ("tokens", (4, 4), 16)
    text = info["transformer_blocks.0.text"]
    assert (text.kind, text.grid, text.channels) == ("tokens", None, 16)
    # the taps are the block's two output elements, as an independent hook sees them
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    outputs = []
    handle = sd3.model.transformer_blocks[0].register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        with torch.no_grad(), sd3.tap([*LAYERS, "transformer_blocks.0.attn.q"]) as found:
            assert sd3.run(x, torch.tensor([300.0])) is None, "stopped early"
    finally:
        handle.remove()
    text_out, image_out = outputs[0]
    assert torch.equal(found["transformer_blocks.0.text"], text_out) and text_out.shape == (3, 77 + 256, 16)
    assert torch.equal(found["transformer_blocks.0"], image_out) and image_out.shape == (3, 16, 16)
    assert found["transformer_blocks.0.attn.q"].shape == (3, 16, 16), "attention taps still work alongside"


def test_a_tap_on_the_wrong_stream_is_refused_naming_it(sd3) -> None:
    with pytest.raises(ValueError, match=r"'transformer_blocks\.1\.text'.*no text stream.*context_pre_only"):
        sd3.modules_by_name(["transformer_blocks.1.text"])
    with pytest.raises(ValueError, match=r"'transformer_blocks\.1\.text'"):
        FeatureExtractor(sd3, ["transformer_blocks.0", "transformer_blocks.1.text"], [10])
    with pytest.raises(ValueError, match=r"'pos_embed\.text'.*only image tokens"):
        FeatureExtractor(sd3, ["pos_embed.text"], [10])
    with pytest.raises(KeyError, match="transformer_blocks.0.txt"):
        FeatureExtractor(sd3, ["transformer_blocks.0.txt"], [10])
    assert sd3.model.transformer_blocks[1].context_pre_only


def test_early_exit_equals_the_full_forward_and_batch_independence(sd3) -> None:
    images, prompts = _images(5, seed=3), [*PROMPTS, "a red car"]
    calls = []
    handle = sd3.model.transformer_blocks[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        fast = FeatureExtractor(sd3, LAYERS, [20, 700], readout=Raw())(images, prompts=prompts)
        assert not calls, "early exit skips the last block"
        full = FeatureExtractor(sd3, LAYERS, [20, 700], readout=Raw(), early_exit=False)(images, prompts=prompts)
        assert calls, "the full forward runs it"
    finally:
        handle.remove()
    assert fast.keys() == full.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], full[key], rtol=0, atol=0)
    assert fast[("transformer_blocks.0.text", 20)].shape == (5, 77 + 256, 16)
    one = FeatureExtractor(sd3, LAYERS, [20, 700], readout=Raw(), batch_size=1)(images, prompts=prompts)
    for key in fast:
        torch.testing.assert_close(one[key], fast[key], rtol=0, atol=0)
    # each image alone gets its own rows' features (encode_prompts encodes each prompt alone, since a
    # (5, 32) @ (32, 16) projection differs from (1, 32) @ (32, 16) by ~5e-7 on the CPU)
    cond = sd3.encode_prompts(prompts)
    extractor = FeatureExtractor(sd3, LAYERS, [20, 700], readout=Raw())
    batch = extractor(images, cond=cond)
    for i in (0, 3):
        alone = extractor(images[i:i + 1], indices=[i], cond={k: v[i:i + 1] for k, v in cond.items()})
        for key in fast:
            torch.testing.assert_close(alone[key][0], batch[key][i], rtol=0, atol=0)


def test_pipeline_folder_round_trip(t5_pipe, sd3) -> None:
    pipe, folder = t5_pipe
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt([""], None, None, device="cpu")
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:3], None, None, device="cpu",
                                                  do_classifier_free_guidance=False)
    memory = SD3Backbone(pipe.transformer, NoiseSchedule.from_scheduler(pipe.scheduler), vae=pipe.vae,
                         condition={"encoder_hidden_states": negative, "pooled_projections": negative_pooled})
    assert type(sd3) is SD3Backbone and sd3.pipeline_dir == folder
    assert sd3.weights_digest() == memory.weights_digest()
    assert sd3.spec() == memory.spec(), "weights, condition, schedule (shift 3), VAE with its shift"
    images = _images(3, seed=4)
    kwargs = {"layers": ["transformer_blocks.0", "transformer_blocks.1"], "timesteps": [100, 800]}
    for loaded, theirs in [(FeatureExtractor(sd3, **kwargs)(images, prompts=PROMPTS[:3]),
                            FeatureExtractor(memory, **kwargs)(images, cond={"encoder_hidden_states": embeds,
                                                                             "pooled_projections": pooled})),
                           (FeatureExtractor(sd3, **kwargs)(images), FeatureExtractor(memory, **kwargs)(images))]:
        for key in loaded:
            torch.testing.assert_close(loaded[key], theirs[key], rtol=0, atol=1e-6)


def test_sd35_qk_norm_and_dual_attention_through_the_same_adapter() -> None:
    config = sd3_config(8, 2, 2, 8, JOINT, POOLED, in_channels=4, pos_embed_max_size=16, qk_norm="rms_norm",
                        dual_attention_layers=(0,))
    cond = {"encoder_hidden_states": torch.randn(2, 20, JOINT, generator=torch.Generator().manual_seed(5)),
            "pooled_projections": torch.randn(2, POOLED, generator=torch.Generator().manual_seed(6))}
    backbone = SD3Backbone.from_config(config, seed=3, condition={k: v[:1] for k, v in cond.items()})
    block = backbone.model.transformer_blocks[0]
    assert block.use_dual_attention and block.attn.norm_q is not None
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([10.0, 950.0])
    with torch.no_grad():
        theirs = backbone.model(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
        torch.testing.assert_close(backbone.denoise(x, t, cond), theirs, rtol=0, atol=0)
    info = backbone.feature_info
    assert "transformer_blocks.0.text" in info and "transformer_blocks.0.attn2.q" in info
    assert info["transformer_blocks.0"].grid == (4, 4)
    layers = ["transformer_blocks.0.attn2.q", "transformer_blocks.0.text", "transformer_blocks.0"]
    fast = FeatureExtractor(backbone, layers, [30, 600], readout=Raw())(x, cond=cond)
    full = FeatureExtractor(backbone, layers, [30, 600], readout=Raw(), early_exit=False)(x, cond=cond)
    for key in fast:
        torch.testing.assert_close(fast[key], full[key], rtol=0, atol=0)
    assert fast[("transformer_blocks.0.text", 30)].shape == (2, 20, 16)
