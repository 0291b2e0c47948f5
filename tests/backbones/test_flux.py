"""FluxBackbone against diffusers' own FluxPipeline built from tiny components."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tiny_text import tiny_vae, write_clip, write_t5

from difffeat.backbones import FluxBackbone, create_backbone
from difffeat.backbones.flux import flux_config, latent_image_ids, pack_latents, unpack_latents
from difffeat.extract import FeatureExtractor
from difffeat.noise import FlowSchedule, NoiseSchedule
from difffeat.readout import Readout

PROMPTS = ["a photo of a dog", "A Blue HOUSE, painting", "", "tree " * 600]  # the last exceeds 512 T5 tokens
LAYERS = ["x_embedder", "transformer_blocks.0.text", "transformer_blocks.0", "single_transformer_blocks.0",
          "single_transformer_blocks.0.text"]
#: FLUX.1's VAE scaling
SHIFT, SCALE = 0.1159, 0.3611
#: FLUX.1-dev's scheduler_config.json
SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
             "base_image_seq_len": 256, "max_image_seq_len": 4096}
CONFIG = flux_config(1, 1, 2, 8, 32, 24, (2, 2, 4), latent_channels=4)


class Raw(Readout):
    """The tap output unchanged (tokens stay tokens), so whole activations are compared."""

    def forward(self, x: torch.Tensor, info) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory) -> tuple[FluxPipeline, object]:
    parts = tmp_path_factory.mktemp("flux_parts")
    clip, clip_tok = write_clip(parts, hidden=24, seed=1)  # a CLIPTextModel: its pooler_output is pooled
    t5, t5_tok = write_t5(parts, d_model=32, seed=2, encoder="text_encoder_2", tokenizer="tokenizer_2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel.from_config(CONFIG).eval()
    vae = tiny_vae(latent_channels=4, seed=5)
    vae.register_to_config(shift_factor=SHIFT, scaling_factor=SCALE)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def flux(flux_pipe):
    return create_backbone(flux_pipe[1], latent_size=8)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(("h", "w"), [(8, 8), (8, 12), (2, 6)])
def test_packing_and_ids_equal_the_pipeline(h: int, w: int) -> None:
    x = torch.randn(3, 4, h, w, generator=torch.Generator().manual_seed(h + w))
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 4, h, w))
    assert torch.equal(unpack_latents(packed, h, w), x)
    vae_factor = 8  # _unpack_latents takes pixel sizes
    assert torch.equal(unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, h * 8, w * 8, vae_factor))
    assert torch.equal(latent_image_ids(h // 2, w // 2),
                       FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu", torch.float32))


def test_prompts_equal_the_pipeline_encode_prompt(flux_pipe, flux) -> None:
    pipe, _ = flux_pipe
    assert type(flux) is FluxBackbone
    ours = flux.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
        empty, empty_pooled, _ = pipe.encode_prompt([""], device="cpu")
    assert ours["encoder_hidden_states"].shape == (4, 512, 32) and ours["pooled_projections"].shape == (4, 24)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(ours["pooled_projections"][0], ours["pooled_projections"][1])
    assert torch.equal(text_ids, torch.zeros(512, 3)), "txt_ids are zeros of the text length (as denoise builds)"
    # the default condition is the empty prompt, encoded
    torch.testing.assert_close(flux.default_condition["encoder_hidden_states"], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(flux.default_condition["pooled_projections"], empty_pooled, rtol=0, atol=1e-6)
    short = create_backbone(flux_pipe[1], latent_size=8, max_sequence_length=20)
    with torch.no_grad():
        embeds_20 = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=20)[0]
    torch.testing.assert_close(short.encode_prompts(PROMPTS)["encoder_hidden_states"], embeds_20, rtol=0, atol=1e-6)


def test_schedule_resolves_the_dynamic_shift_at_the_latent_size(flux_pipe, flux) -> None:
    pipe, _ = flux_pipe
    tokens = (8 // 2) ** 2
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert isinstance(flux.schedule, FlowSchedule) and flux.schedule.dynamic is None
    assert math.isclose(flux.schedule.shift, math.exp(mu), rel_tol=1e-12)
    t = torch.tensor([900, 500, 5])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=(t / 1000).tolist(), mu=mu)  # what FluxPipeline does at 16 image tokens
    torch.testing.assert_close(flux.schedule.sigmas(t), scheduler.sigmas[:3].double(), rtol=1e-6, atol=0)
    larger = create_backbone(flux_pipe[1], latent_size=64)  # 1024 tokens: a larger shift
    assert math.isclose(larger.schedule.shift, math.exp(calculate_shift(1024, 256, 4096, 0.5, 1.15)))
    assert FluxBackbone.default_scheduler["use_dynamic_shifting"]
    default = FluxBackbone(pipe.transformer, NoiseSchedule.from_config(FluxBackbone.default_scheduler), latent_size=8)
    assert default.schedule.spec() == flux.schedule.spec()
    with pytest.raises(ValueError, match="even"):
        FluxBackbone(pipe.transformer, flux.schedule, latent_size=7)


@pytest.mark.parametrize(("h", "w"), [(8, 8), (8, 12)])
def test_denoise_equals_one_transformer_call_as_the_pipeline_makes_it(flux_pipe, flux, h: int, w: int) -> None:
    pipe, _ = flux_pipe
    cond = flux.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w))
    timestep = flux.schedule.model_timesteps(torch.tensor([900, 5]))  # what the extractor passes: sigma * 1000
    with torch.no_grad():
        _, _, text_ids = pipe.encode_prompt(PROMPTS[:2], device="cpu")
        packed = FluxPipeline._pack_latents(x, 2, 4, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
        guidance = torch.full([1], 3.5, dtype=torch.float32).expand(2)
        out = pipe.transformer(hidden_states=packed, timestep=timestep.to(x.dtype) / 1000, guidance=guidance,
                               pooled_projections=cond["pooled_projections"],
                               encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=text_ids,
                               img_ids=image_ids, return_dict=False)[0]
        theirs = FluxPipeline._unpack_latents(out, h * 2, w * 2, 2)  # the tiny VAE's factor is 2
        ours = flux.denoise(x, timestep, cond)
        other_guidance = FluxBackbone(pipe.transformer, flux.schedule, latent_size=8, guidance=1.0,
                                      condition=cond).denoise(x, timestep)
    assert ours.shape == (2, 4, h, w)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(other_guidance, ours), "the guidance scale reaches the output"
    assert flux.spec()["condition"]["guidance"] == 3.5


def test_a_model_without_guidance_embedding() -> None:
    config = flux_config(1, 1, 2, 8, 32, 24, (2, 2, 4), latent_channels=4, guidance_embeds=False)
    cond = {"encoder_hidden_states": torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)),
            "pooled_projections": torch.randn(1, 24, generator=torch.Generator().manual_seed(2))}
    backbone = FluxBackbone.from_config(config, latent_size=8, condition=cond)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([400.0, 20.0])
    with torch.no_grad():
        out = backbone.model(hidden_states=pack_latents(x), timestep=t / 1000, guidance=None,
                             encoder_hidden_states=cond["encoder_hidden_states"].expand(2, -1, -1),
                             pooled_projections=cond["pooled_projections"].expand(2, -1), txt_ids=torch.zeros(7, 3),
                             img_ids=latent_image_ids(4, 4), return_dict=False)[0]
        torch.testing.assert_close(backbone.denoise(x, t), unpack_latents(out, 8, 8), rtol=0, atol=0)
    assert "guidance" not in backbone.spec()["condition"]


def test_encode_applies_the_vae_shift_factor(flux) -> None:
    images = _images(2)
    with torch.no_grad():
        mode = flux.vae.encode(images).latent_dist.mode()
        ours = flux.encode(images)
    torch.testing.assert_close(ours, (mode - SHIFT) * SCALE, rtol=0, atol=0)
    assert (ours - mode * SCALE).abs().min() > 0.04, "the shift is not ignored"


def test_feature_info_and_stream_taps(flux) -> None:
    info = flux.feature_info
    plain = [n for n in info if ".attn" not in n]
    assert plain == ["x_embedder", "transformer_blocks.0", "transformer_blocks.0.text", "single_transformer_blocks.0",
                     "single_transformer_blocks.0.text"], "each text tap right after its block, in execution order"
    assert [i.order for i in info.values()] == list(range(len(info)))
    for name in ("x_embedder", "transformer_blocks.0", "single_transformer_blocks.0"):
        assert (info[name].kind, info[name].grid, info[name].channels) == ("tokens", (4, 4), 16)
    for name in ("transformer_blocks.0.text", "single_transformer_blocks.0.text"):
        assert (info[name].kind, info[name].grid, info[name].channels) == ("tokens", None, 16)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    outputs = {}
    blocks = {"double": flux.model.transformer_blocks[0], "single": flux.model.single_transformer_blocks[0]}
    handles = [m.register_forward_hook(lambda _m, _i, out, k=k: outputs.setdefault(k, out)) for k, m in blocks.items()]
    try:
        with torch.no_grad(), flux.tap(LAYERS) as found:
            assert flux.run(x, torch.tensor([300.0])) is None
    finally:
        for h in handles:
            h.remove()
    for kind, prefix in (("double", "transformer_blocks.0"), ("single", "single_transformer_blocks.0")):
        text, image = outputs[kind]
        assert torch.equal(found[prefix], image) and image.shape == (3, 16, 16)
        assert torch.equal(found[f"{prefix}.text"], text) and text.shape == (3, 512, 16)
    # a block returning text and image tokens concatenated (older single blocks) is split at the text length
    joined = torch.cat([outputs["single"][0], outputs["single"][1]], dim=1)
    assert torch.equal(flux.read_output("single_transformer_blocks.0", joined), outputs["single"][1])
    assert torch.equal(flux.read_output("single_transformer_blocks.0.text", joined), outputs["single"][0])


def test_a_tap_on_the_wrong_stream_is_refused_naming_it(flux) -> None:
    with pytest.raises(ValueError, match=r"'x_embedder\.text'.*only image tokens"):
        FeatureExtractor(flux, ["transformer_blocks.0", "x_embedder.text"], [10])
    with pytest.raises(KeyError, match=r"single_transformer_blocks\.1\.text"):
        flux.modules_by_name(["single_transformer_blocks.1.text"])


def test_early_exit_equals_the_full_forward_and_batch_independence(flux) -> None:
    images, prompts = _images(5, seed=3), [*PROMPTS, "a red car"]
    calls = []
    handles = [flux.model.single_transformer_blocks[0].register_forward_hook(lambda *_: calls.append("single")),
               flux.model.norm_out.register_forward_hook(lambda *_: calls.append("out"))]
    try:
        fast = FeatureExtractor(flux, LAYERS[:3], [20, 700], readout=Raw())(images, prompts=prompts)
        assert not calls, "stopped after the double block's two streams"
        fast.update(FeatureExtractor(flux, LAYERS, [20, 700], readout=Raw())(images, prompts=prompts))
        assert "single" in calls and "out" not in calls, "stopped after the single block's two streams"
        full = FeatureExtractor(flux, LAYERS, [20, 700], readout=Raw(), early_exit=False)(images, prompts=prompts)
        assert "out" in calls, "the full forward runs to the output"
    finally:
        for h in handles:
            h.remove()
    assert fast.keys() == full.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], full[key], rtol=0, atol=0)
    one = FeatureExtractor(flux, LAYERS, [20, 700], readout=Raw(), batch_size=1)(images, prompts=prompts)
    for key in full:
        torch.testing.assert_close(one[key], full[key], rtol=0, atol=0)
    cond = flux.encode_prompts(prompts)  # the rows of one condition, routed per image below
    extractor = FeatureExtractor(flux, LAYERS, [20, 700], readout=Raw())
    batch = extractor(images, cond=cond)
    for i in (0, 4):
        alone = extractor(images[i:i + 1], indices=[i], cond={k: v[i:i + 1] for k, v in cond.items()})
        for key in batch:
            torch.testing.assert_close(alone[key][0], batch[key][i], rtol=0, atol=0)


def test_pipeline_folder_round_trip(flux_pipe, flux) -> None:
    pipe, folder = flux_pipe
    with torch.no_grad():
        empty, empty_pooled, _ = pipe.encode_prompt([""], device="cpu")
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS[:3], device="cpu")
    memory = FluxBackbone(pipe.transformer, NoiseSchedule.from_scheduler(pipe.scheduler), vae=pipe.vae, latent_size=8,
                          condition={"encoder_hidden_states": empty, "pooled_projections": empty_pooled})
    assert flux.pipeline_dir == folder and flux.weights_digest() == memory.weights_digest()
    assert flux.spec() == memory.spec(), "weights, condition, guidance, resolved schedule, VAE with its shift"
    images = _images(3, seed=4)
    kwargs = {"layers": ["transformer_blocks.0", "single_transformer_blocks.0"], "timesteps": [100, 800]}
    for loaded, theirs in [(FeatureExtractor(flux, **kwargs)(images, prompts=PROMPTS[:3]),
                            FeatureExtractor(memory, **kwargs)(images, cond={"encoder_hidden_states": embeds,
                                                                             "pooled_projections": pooled})),
                           (FeatureExtractor(flux, **kwargs)(images), FeatureExtractor(memory, **kwargs)(images))]:
        for key in loaded:
            torch.testing.assert_close(loaded[key], theirs[key], rtol=0, atol=1e-6)
