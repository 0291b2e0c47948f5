"""FeatureExtractor: early exit, batched timesteps, seeding, ensembles, bad input."""

from __future__ import annotations

import pytest
import torch

from difffeat.backbones import create_backbone
from difffeat.extract import FeatureExtractor, feature_name, parse_feature_name
from difffeat.readout import Identity


@pytest.fixture(scope="module")
def unet():
    return create_backbone("unet2d-tiny")


@pytest.mark.parametrize("name,layers", [("unet2d-tiny", ["down_blocks.1", "mid_block"]),
                                         ("sd-unet-tiny", ["down_blocks.0", "mid_block"]),
                                         ("dit-tiny", ["transformer_blocks.1"])])
def test_early_exit_taps_equal_full_forward(name, layers) -> None:
    backbone = create_backbone(name)
    x = torch.rand(3, backbone.image_channels, backbone.image_size, backbone.image_size) * 2 - 1
    kw = {"layers": layers, "timesteps": [5, 400], "readout": Identity()}
    early = FeatureExtractor(backbone, early_exit=True, **kw)(x)
    full = FeatureExtractor(backbone, early_exit=False, **kw)(x)
    assert list(early) == [(layer, t) for layer in layers for t in (5, 400)]
    for key in early:
        assert torch.equal(early[key], full[key]), key


def test_early_exit_skips_the_rest_of_the_network(unet) -> None:
    assert unet.feature_info  # the one-off probe forward runs the whole network; do it first
    calls = []
    handle = unet.model.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        FeatureExtractor(unet, ["down_blocks.0"], [1])(torch.zeros(1, 1, 16, 16))
        assert calls == []
        FeatureExtractor(unet, ["down_blocks.0"], [1], early_exit=False)(torch.zeros(1, 1, 16, 16))
        assert calls == [1]
    finally:
        handle.remove()
    assert not any(m._forward_hooks for m in unet.model.modules() if m is not unet.model.conv_out)


def test_batched_timesteps_equal_one_call_per_timestep(unet, digits_images) -> None:
    x = digits_images[:4]
    both = FeatureExtractor(unet, ["mid_block"], [10, 300], readout=Identity())(x, indices=range(4))
    for t in (10, 300):
        single = FeatureExtractor(unet, ["mid_block"], [t], readout=Identity())(x, indices=range(4))
        torch.testing.assert_close(both[("mid_block", t)], single[("mid_block", t)], rtol=1e-5, atol=1e-6)


def test_features_do_not_depend_on_batch_order(unet, digits_images) -> None:
    fe = FeatureExtractor(unet, ["up_blocks.0"], [50], readout=Identity())
    a = fe(digits_images[:6], indices=torch.arange(6))[("up_blocks.0", 50)]
    perm = torch.tensor([4, 0, 5, 2])
    b = fe(digits_images[perm], indices=perm)[("up_blocks.0", 50)]
    torch.testing.assert_close(a[perm], b, rtol=1e-5, atol=1e-6)


def test_same_seed_same_bits_and_ensemble_is_a_mean(unet, digits_images) -> None:
    x = digits_images[:3]
    one = FeatureExtractor(unet, ["mid_block"], [200], seed=3)
    assert torch.equal(one(x)[("mid_block", 200)], one(x)[("mid_block", 200)])
    ens = FeatureExtractor(unet, ["mid_block"], [200], seed=3, ensemble=2)(x)[("mid_block", 200)]
    other = FeatureExtractor(unet, ["mid_block"], [200], seed=3, ensemble=2)
    # member 1 alone, built from the noise stream the ensemble uses for its second draw
    from difffeat.noise import seeded_noise

    eps = seeded_noise((1, 16, 16), range(3), 3, member=1)
    t = torch.full((3,), 200)
    x_t = unet.schedule.add_noise(x, eps, t)
    with torch.no_grad(), unet.tap(["mid_block"]) as found:
        unet.run(x_t, t)
    member1 = found["mid_block"].mean((2, 3))
    torch.testing.assert_close(ens, (one(x)[("mid_block", 200)] + member1) / 2, rtol=1e-5, atol=1e-6)
    assert other.ensemble == 2


def test_backbone_is_frozen(unet) -> None:
    fe = FeatureExtractor(unet, ["mid_block"], [1]).train()
    assert not any(p.requires_grad for p in fe.backbone.parameters())
    assert not fe.backbone.training


def test_unknown_layer_fails_at_construction(unet) -> None:
    with pytest.raises(KeyError, match="valid layers"):
        FeatureExtractor(unet, ["mid_blok"], [1])


def test_timestep_out_of_range_fails_at_construction(unet) -> None:
    with pytest.raises(ValueError, match="out of range"):
        FeatureExtractor(unet, ["mid_block"], [1000])


def test_wrong_channel_count_is_named(unet) -> None:
    with pytest.raises(ValueError, match="3 channels.*expects 1"):
        FeatureExtractor(unet, ["mid_block"], [1])(torch.zeros(2, 3, 16, 16))


def test_non_finite_input_is_refused(unet) -> None:
    x = torch.zeros(3, 1, 16, 16)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf.*\[1\]"):
        FeatureExtractor(unet, ["mid_block"], [1])(x)


def test_dit_tokens_and_sd_vae_path() -> None:
    dit = create_backbone("dit-tiny")
    feats = FeatureExtractor(dit, ["transformer_blocks.2"], [10], readout=Identity(output_fmt="NLC"))(
        torch.randn(2, 4, 8, 8))
    assert feats[("transformer_blocks.2", 10)].shape == (2, 16, 32)
    maps = FeatureExtractor(dit, ["transformer_blocks.2"], [10], readout=Identity())(torch.randn(2, 4, 8, 8))
    assert maps[("transformer_blocks.2", 10)].shape == (2, 32, 4, 4)


def test_feature_names_round_trip() -> None:
    assert parse_feature_name(feature_name(("up_blocks.1", 10))) == ("up_blocks.1", 10)
    with pytest.raises(ValueError):
        parse_feature_name("up_blocks.1")
