"""Attention internals as taps: queries, keys, values and attention maps of every attention module."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import AttnProcessor

from difffeat.backbones import Backbone, create_backbone
from difffeat.backbones import attention as attention_module
from difffeat.backbones.attention import attention_modules
from difffeat.extract import FeatureExtractor
from difffeat.noise import NoiseSchedule
from difffeat.readout import GlobalAvg, Identity

SD_SELF = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
SD_CROSS = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
#: per backbone: the attention modules checked (self-attention first, then any cross-attention)
CASES = {
    "sd-unet-tiny": [SD_SELF, SD_CROSS, "mid_block.attentions.0.transformer_blocks.0.attn2"],
    "dit-tiny": ["transformer_blocks.1.attn1"],
    "unet2d-tiny": ["down_blocks.1.attentions.0", "mid_block.attentions.0"],
}


def _inputs(backbone: Backbone, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, object]:
    """A random latent batch, timesteps and a random (non-constant) text condition where the model takes one."""
    gen = torch.Generator().manual_seed(seed)
    size = backbone.latent_size
    x = torch.randn(batch, backbone.latent_channels, size, size, generator=gen)
    t = torch.tensor([10, 600][:batch])
    cond = None
    if "cross_attention_dim" in backbone.model.config and backbone.model.config.cross_attention_dim:
        # random prompt embeddings of SD's 77 tokens: zeros would make every key equal and every map uniform
        cond = torch.randn(batch, 77, backbone.model.config.cross_attention_dim, generator=gen)
    return x, t, cond


_CACHE: dict[str, Backbone] = {}


def _shared(name: str) -> Backbone:
    """One backbone per name for the tests that do not change it (building and probing is the slow part)."""
    if name not in _CACHE:
        _CACHE[name] = create_backbone(name).eval()
    return _CACHE[name]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _Recorder:
    """Independent forward hooks recording module outputs and the inputs of ``to_out[0]``."""

    def __init__(self, modules: dict[str, torch.nn.Module], inputs_of: dict[str, torch.nn.Module] | None = None):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]
        self.handles += [m.register_forward_pre_hook(self._pre(n)) for n, m in (inputs_of or {}).items()]

    def _hook(self, name: str):
        def hook(_m, _i, out):
            self.out[name] = out

        return hook

    def _pre(self, name: str):
        def hook(_m, args):
            self.out[name] = args[0]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", list(CASES))
def test_qkv_taps_are_the_projection_outputs(name: str) -> None:
    backbone = _shared(name)
    attns = attention_modules(backbone.model)
    paths = CASES[name]
    taps = [f"{p}.{part}" for p in paths for part in ("q", "k", "v")]
    x, t, cond = _inputs(backbone)
    rec = _Recorder({f"{p}.{part}": getattr(attns[p], f"to_{part}") for p in paths for part in ("q", "k", "v")})
    try:
        with torch.no_grad(), backbone.tap(taps, stop_early=False) as found:
            backbone.run(x, t, cond)
    finally:
        rec.remove()
    info = backbone.feature_info
    for tap in taps:
        torch.testing.assert_close(found[tap], rec.out[tap], rtol=0, atol=0)
        assert info[tap].kind == "tokens" and info[tap].channels == found[tap].shape[-1]
    q = info[f"{paths[0]}.q"]
    assert q.grid is not None and q.grid[0] * q.grid[1] == found[f"{paths[0]}.q"].shape[1]
    if name == "sd-unet-tiny":  # a cross-attention's keys are the 77 text tokens: no image grid
        assert found[f"{SD_CROSS}.k"].shape[1] == 77 and info[f"{SD_CROSS}.k"].grid is None


@pytest.mark.parametrize("name", list(CASES))
def test_maps_equal_diffusers_attention_probabilities(name: str) -> None:
    """``map_heads`` against ``Attention.get_attention_scores`` under diffusers' non-SDPA ``AttnProcessor``."""
    backbone = create_backbone(name).eval()
    attns = attention_modules(backbone.model)
    paths = CASES[name]
    for path in paths:
        attns[path].set_processor(AttnProcessor())
    reference: dict[str, torch.Tensor] = {}
    for path in paths:
        attn = attns[path]

        def scores(query, key, attention_mask=None, _attn=attn, _path=path):
            probs = type(_attn).get_attention_scores(_attn, query, key, attention_mask)
            reference[_path] = probs
            return probs

        attn.get_attention_scores = scores
    x, t, cond = _inputs(backbone)
    taps = [f"{p}.{part}" for p in paths for part in ("map", "map_heads")]
    with torch.no_grad(), backbone.tap(taps, stop_early=False) as found:
        backbone.run(x, t, cond)
    info = backbone.feature_info
    for path in paths:
        heads = attns[path].heads
        per_head = found[f"{path}.map_heads"]
        b, h, nq, nk = per_head.shape
        assert h == heads and b == x.shape[0]
        torch.testing.assert_close(per_head, reference[path].view(b, heads, nq, nk))
        torch.testing.assert_close(per_head.sum(-1), torch.ones(b, heads, nq))
        torch.testing.assert_close(found[f"{path}.map"], per_head.mean(1), rtol=0, atol=1e-7)
        assert info[f"{path}.map"].kind == "attention" and info[f"{path}.map"].channels == nk
        assert info[f"{path}.map_heads"].kind == "attention_heads"
        assert nq == info[f"{path}.q"].grid[0] * info[f"{path}.q"].grid[1]
        assert per_head.std() > 0  # not a uniform map: the test would pass for any constant
    if name == "sd-unet-tiny":
        assert found[f"{SD_CROSS}.map"].shape[-1] == 77 and info[f"{SD_CROSS}.map"].channels == 77
        assert found[f"{SD_SELF}.map"].shape[-1] == found[f"{SD_SELF}.map"].shape[-2] == 64


@pytest.mark.parametrize("name", list(CASES))
def test_maps_times_values_give_the_sdpa_processor_output(name: str) -> None:
    """Under the default SDPA processor: map_heads @ values (per head) is what the processor feeds ``to_out``."""
    backbone = _shared(name)
    attns = attention_modules(backbone.model)
    paths = CASES[name]
    x, t, cond = _inputs(backbone)
    rec = _Recorder({f"{p}.v": attns[p].to_v for p in paths}, {f"{p}.out": attns[p].to_out[0] for p in paths})
    try:
        with torch.no_grad(), backbone.tap([f"{p}.map_heads" for p in paths], stop_early=False) as found:
            backbone.run(x, t, cond)
    finally:
        rec.remove()
    for path in paths:
        probs, v = found[f"{path}.map_heads"], rec.out[f"{path}.v"]
        b, heads = probs.shape[:2]
        v = v.view(b, v.shape[1], heads, -1).transpose(1, 2)
        out = (probs @ v).transpose(1, 2).reshape(b, probs.shape[2], -1)
        torch.testing.assert_close(out, rec.out[f"{path}.out"])


@pytest.mark.parametrize(("name", "tap"), [("sd-unet-tiny", f"{SD_CROSS}.map"), ("unet2d-tiny",
                                                                                "down_blocks.1.attentions.0.map")])
def test_early_exit_at_a_map_gives_the_full_forward_map(name: str, tap: str) -> None:
    backbone = _shared(name)
    x, t, cond = _inputs(backbone)
    assert tap in backbone.feature_info  # the probe runs the whole network: before the recorder
    later = _Recorder({"conv_out": backbone.model.conv_out})
    try:
        with torch.no_grad(), backbone.tap([tap, "conv_in"], stop_early=True) as early:
            assert backbone.run(x, t, cond) is None  # stopped by the map's hook
        assert "conv_out" not in later.out
        with torch.no_grad(), backbone.tap([tap], stop_early=False) as full:
            assert backbone.run(x, t, cond) is not None
        assert "conv_out" in later.out
    finally:
        later.remove()
    torch.testing.assert_close(early[tap], full[tap], rtol=0, atol=0)


def test_memory_guard_names_the_tap_and_size_and_hooks_are_removed(monkeypatch) -> None:
    backbone = _shared("sd-unet-tiny")
    x, t, cond = _inputs(backbone)
    tap = f"{SD_SELF}.map_heads"
    assert backbone.feature_info  # probe first (it allocates no map, so the tiny limit does not stop it)
    before = _hook_count(backbone.model)
    monkeypatch.setattr(attention_module, "MAP_MEMORY_LIMIT", 1024)
    # (2 images, 2 heads, 64 queries, 64 keys) float32 = 65536 bytes = 0.06 MiB
    expected = re.escape(f"{tap}': a float32 map of shape (2, 2, 64, 64) takes 65,536 bytes") + ".*limit of 1,024 bytes"
    with pytest.raises(MemoryError, match=expected), torch.no_grad(), backbone.tap([tap, f"{SD_SELF}.q"]):
        backbone.run(x, t, cond)
    assert _hook_count(backbone.model) == before  # virtual taps cleaned up after the error
    with torch.no_grad(), backbone.tap([f"{SD_SELF}.q"]) as found:  # q/k/v are not maps: no guard
        backbone.run(x, t, cond)
    assert found[f"{SD_SELF}.q"].shape == (2, 64, 16)
    monkeypatch.setattr(attention_module, "MAP_MEMORY_LIMIT", 2 * 64 * 64 * 4)  # the head mean fits exactly
    with torch.no_grad(), backbone.tap([f"{SD_SELF}.map"]) as found:
        backbone.run(x, t, cond)
    assert found[f"{SD_SELF}.map"].shape == (2, 64, 64)
    assert _hook_count(backbone.model) == before


def test_memory_guard_message() -> None:
    backbone = create_backbone("dit-tiny").eval()
    attn = attention_modules(backbone.model)["transformer_blocks.0.attn1"]
    q = torch.zeros(3, 16384, 32)
    with pytest.raises(MemoryError) as err:
        attention_module.attention_map(attn, q, [(q, None)], mean_heads=False, name="some.attn1.map_heads")
    message = str(err.value)  # 3·2·16384²·4 bytes = 6 GiB, refused before allocating
    assert "'some.attn1.map_heads'" in message and "(3, 2, 16384, 16384)" in message
    assert "6,442,450,944 bytes (6144.0 MiB)" in message and "limit of 2,147,483,648 bytes" in message


def test_extractor_reads_attention_taps() -> None:
    backbone = _shared("sd-unet-tiny")
    x = torch.rand(3, 4, 8, 8) * 2 - 1
    cond = torch.randn(3, 77, 16, generator=torch.Generator().manual_seed(1))
    layers = [f"{SD_CROSS}.map", f"{SD_SELF}.q", f"{SD_CROSS}.map_heads"]
    feats = FeatureExtractor(backbone, layers, [10], readout=Identity())(x, cond=cond)
    cross = feats[(f"{SD_CROSS}.map", 10)]
    assert cross.shape == (3, 77, 8, 8)  # each text token's attention folded onto the 8x8 query grid
    torch.testing.assert_close(cross.sum(1), torch.ones(3, 8, 8))
    assert feats[(f"{SD_SELF}.q", 10)].shape == (3, 16, 8, 8)
    heads = feats[(f"{SD_CROSS}.map_heads", 10)]
    assert heads.shape == (3, 2, 64, 77)  # Identity passes the per-head map through
    torch.testing.assert_close(heads.mean(1).transpose(1, 2).reshape(3, 77, 8, 8), cross)
    pooled = FeatureExtractor(backbone, [f"{SD_CROSS}.map"], [10], readout=GlobalAvg())(x, cond=cond)
    torch.testing.assert_close(pooled[(f"{SD_CROSS}.map", 10)], cross.mean((2, 3)))
    # early exit at the map gives the same features as the whole network
    full = FeatureExtractor(backbone, [f"{SD_CROSS}.map"], [10], readout=Identity(), early_exit=False)(x, cond=cond)
    torch.testing.assert_close(full[(f"{SD_CROSS}.map", 10)], cross, rtol=0, atol=0)


def test_unknown_name_error_stays_readable() -> None:
    backbone = _shared("sd-unet-tiny")
    with pytest.raises(KeyError) as err:
        backbone.modules_by_name([f"{SD_SELF}.qq"])
    message = str(err.value)
    assert "valid layers" in message and "mid_block" in message and "attention taps" in message
    assert "{q,k,v,map,map_heads}" in message and "8 attention module(s)" in message
    assert f"{SD_SELF}.q'" not in message and len(message) < 1500  # attention taps summarised, not listed
    modules = backbone.modules_by_name([f"{SD_SELF}.k", f"{SD_SELF}.map", "mid_block"])
    attn = backbone.model.get_submodule(SD_SELF)
    assert modules[f"{SD_SELF}.k"] is attn.to_k and modules[f"{SD_SELF}.map"] is attn


class _SD3(Backbone):
    """A test adapter for a joint-attention SD3 transformer (image stream 1 of each block)."""

    output_streams = {"transformer_blocks": 1}  # noqa: RUF012

    def __init__(self) -> None:
        torch.manual_seed(0)
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                      num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                      pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                      qk_norm="rms_norm", dual_attention_layers=(0,))
        super().__init__(model, NoiseSchedule.from_config({}))
        gen = torch.Generator().manual_seed(3)
        self.text, self.pooled = torch.randn(1, 5, 12, generator=gen), torch.randn(1, 8, generator=gen)

    def tap_names(self) -> list[str]:
        return ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        return 4, 4

    def denoise(self, x_t, t, cond=None):
        b = x_t.shape[0]
        return self.model(x_t, encoder_hidden_states=self.text.expand(b, -1, -1),
                          pooled_projections=self.pooled.expand(b, -1), timestep=t).sample


def test_joint_attention_map_covers_image_queries_over_image_and_text_keys() -> None:
    backbone = _SD3().eval()
    path = "transformer_blocks.0.attn"
    attn = backbone.model.get_submodule(path)
    assert attn.norm_q is not None and attn.add_k_proj is not None  # qk-normed joint attention
    info = backbone.feature_info
    assert info[f"{path}.map"].channels == 16 + 5 and info[f"{path}.map"].grid == (4, 4)
    assert "transformer_blocks.0.attn2.map" in info  # SD3.5's extra image self-attention
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    rec = _Recorder({"v": attn.to_v, "add_v": attn.add_v_proj, "q": attn.to_q}, {"out": attn.to_out[0]})
    try:
        with torch.no_grad(), backbone.tap([f"{path}.map_heads", f"{path}.map", f"{path}.q"]) as found:
            backbone.run(x, t)
    finally:
        rec.remove()
    probs = found[f"{path}.map_heads"]
    assert probs.shape == (2, 2, 16, 21)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 16))
    values = torch.cat([rec.out["v"], rec.out["add_v"]], 1).view(2, 21, 2, 8).transpose(1, 2)
    # the processor's joint attention output for the image rows: the map must include norm_q / norm_k
    torch.testing.assert_close((probs @ values).transpose(1, 2).reshape(2, 16, 16), rec.out["out"])
    torch.testing.assert_close(found[f"{path}.q"], rec.out["q"], rtol=0, atol=0)
    torch.testing.assert_close(found[f"{path}.map"], probs.mean(1), rtol=0, atol=1e-7)


class _Flux(Backbone):
    """A test adapter for a Flux transformer on 4x4x4 latents (patch 1), text of 3 tokens."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                       pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
        super().__init__(model, NoiseSchedule.from_config({}))
        gen = torch.Generator().manual_seed(3)
        self.text, self.pooled = torch.randn(1, 3, 12, generator=gen), torch.randn(1, 8, generator=gen)

    @property
    def latent_size(self) -> int:
        return 4

    def tap_names(self) -> list[str]:
        return ["transformer_blocks.0"]

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        return 4, 4

    def denoise(self, x_t, t, cond=None):
        b, _, h, w = x_t.shape
        grid = torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
        img_ids = torch.stack(grid, -1).reshape(-1, 3)
        return self.model(x_t.flatten(2).transpose(1, 2), encoder_hidden_states=self.text.expand(b, -1, -1),
                          pooled_projections=self.pooled.expand(b, -1), timestep=t.float() / 1000,
                          img_ids=img_ids, txt_ids=torch.zeros(3, 3)).sample


def test_rotary_attention_maps_are_refused_and_projections_offered() -> None:
    backbone = _Flux().eval()
    path = "transformer_blocks.0.attn"
    info = backbone.feature_info
    assert f"{path}.q" in info and f"{path}.map" not in info and "single_transformer_blocks.0.attn.k" in info
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.map.*rotary"):
        FeatureExtractor(backbone, [f"{path}.map"], [10])
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([3, 700])
    rec = _Recorder({"q": backbone.model.get_submodule(path).to_q})
    try:
        with torch.no_grad(), backbone.tap([f"{path}.q"]) as found:
            backbone.run(x, t)
    finally:
        rec.remove()
    torch.testing.assert_close(found[f"{path}.q"], rec.out["q"], rtol=0, atol=0)
    assert info[f"{path}.q"].grid == (4, 4)
    assert info["single_transformer_blocks.0.attn.q"].grid is None  # text and image tokens together: no grid


def test_cross_attention_map_applies_the_text_mask_as_the_processor_does() -> None:
    backbone = create_backbone("sd-unet-tiny").eval()
    attn = backbone.model.get_submodule(SD_CROSS)
    attn.set_processor(AttnProcessor())
    reference = {}

    def scores(query, key, attention_mask=None):
        reference["probs"] = type(attn).get_attention_scores(attn, query, key, attention_mask)
        return reference["probs"]

    attn.get_attention_scores = scores
    x, t, cond = _inputs(backbone)
    mask = torch.ones(2, 77)
    mask[0, 10:], mask[1, 40:] = 0, 0  # padded prompt tokens
    with torch.no_grad(), backbone.tap([f"{SD_CROSS}.map_heads"], stop_early=False) as found:
        backbone.model(x, t, encoder_hidden_states=cond, encoder_attention_mask=mask)
    probs = found[f"{SD_CROSS}.map_heads"]
    torch.testing.assert_close(probs, reference["probs"].view(probs.shape))
    assert probs[0, :, :, 10:].max() < 1e-30 and probs[1, :, :, 40:].max() < 1e-30
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
