"""Tests of difffeat.rae: the dimension-dependent shift, latent normalisation, noise-augmented decoding,
the AutoencoderRAE and timm encoders, persistence and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import AutoencoderRAE

from difffeat.noise import FlowSchedule, NoiseSchedule
from difffeat.rae import (
    RAE,
    LatentStats,
    ReconstructionLoss,
    TimmAutoencoderRAE,
    digits_autoencoder,
    load_autoencoder,
    pretrain_mae_encoder,
    shift_alpha,
    shift_time,
    shifted_scheduler_config,
    tokens_to_grid,
    train_decoder,
)
from difffeat.sample import sampling_scheduler


def tiny_digits_rae(seed: int = 0) -> RAE:
    """A 1-layer, 64-wide MAE-config AutoencoderRAE on 16x16 grey images: latent 64 x 8 x 8."""
    return RAE(digits_autoencoder(hidden_size=64, num_layers=1, decoder_hidden_size=32, decoder_layers=1,
                                  decoder_heads=2, seed=seed), image_channels=1).eval()


def tiny_timm_rae(img_size: tuple[int, int] = (16, 24)) -> RAE:
    ae = TimmAutoencoderRAE("vit_tiny_patch16_224", {"img_size": img_size, "patch_size": 4, "in_chans": 1,
                                                     "embed_dim": 32, "depth": 1, "num_heads": 2},
                            decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                            decoder_intermediate_size=64, patch_size=4)
    return RAE(ae, image_channels=1).eval()


def images(n: int = 8, size: tuple[int, int] = (16, 16), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- shift
@pytest.mark.parametrize("alpha", [0.5, 1.0, math.sqrt(2), 4.0])
def test_shift_properties(alpha):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = shift_time(t, alpha)
    assert s[0] == 0 and s[-1] == 1
    assert (s.diff() > 0).all()  # strictly monotone
    if alpha > 1:
        assert (s >= t).all() and (s[1:-1] > t[1:-1]).all()
    elif alpha == 1:
        assert torch.equal(s, t)
    else:
        assert (s[1:-1] < t[1:-1]).all()


def test_shift_alpha_and_schedule_use_it():
    assert shift_alpha((128, 8, 8)) == pytest.approx(math.sqrt(2))
    assert shift_alpha((64, 8, 8)) == 1.0  # m = n: the shift does nothing
    schedule = NoiseSchedule.from_config(shifted_scheduler_config((128, 8, 8)))
    assert isinstance(schedule, FlowSchedule) and schedule.shift == pytest.approx(math.sqrt(2))
    # training-time t: the schedule's noise level of a uniform index is the shifted time
    k = torch.arange(0, 1000, 37)
    assert torch.allclose(schedule.sigmas(k), shift_time(k / 1000, schedule.shift), atol=1e-12)
    # sampling grid: the Euler sampler visits the shifted uniform grid
    scheduler, _, _ = sampling_scheduler(schedule, 10)
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)[:-1]
    assert torch.allclose(scheduler.sigmas[:-1].double(), shift_time(grid, schedule.shift), atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        shift_time(0.5, 0.0)


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("mode,shape", [("element", (64, 8, 8)), ("channel", (64, 1, 1))])
def test_normalisation_round_trip(tmp_path, mode, shape):
    rae = tiny_digits_rae()
    x = images(16)
    stats = rae.fit_latent_stats(x, mode=mode)
    assert tuple(stats.mean.shape) == shape and stats.mode == mode
    z = rae.encode(x)
    dims = (0,) if mode == "element" else (0, 2, 3)
    assert z.double().mean(dims).abs().max() < 1e-4
    assert (z.double().std(dims, unbiased=False) - 1).abs().max() < 1e-3
    raw = rae.raw_latents(x)
    assert torch.allclose(rae.denormalize(rae.normalize(raw)), raw, atol=1e-5, rtol=1e-6)
    # the file round trip is bit-exact and remembers the encoder
    stats.save(tmp_path / "stats.safetensors")
    back = LatentStats.load(tmp_path / "stats.safetensors", encoder=rae.encoder_digest())
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std) and back.mode == mode
    assert rae.latent_stats().mode == mode


def test_normalisation_file_of_another_encoder_is_refused(tmp_path):
    a, b = tiny_digits_rae(0), tiny_digits_rae(1)
    stats = a.fit_latent_stats(images(8))
    stats.save(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="another encoder"):
        LatentStats.load(tmp_path / "a.safetensors", encoder=b.encoder_digest())
    with pytest.raises(ValueError, match="another encoder"):
        b.set_latent_stats(stats)
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own header error)
        LatentStats.load(tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------- noise augmentation
def test_noise_augmentation_only_in_training():
    rae = tiny_digits_rae()
    x = images(32)
    rae.set_noise_tau(0.8)
    clean = rae.raw_latents(x)
    assert torch.equal(rae.eval().encode(x), rae.encode(x))  # eval: deterministic
    assert torch.equal(rae.encode(x), rae.normalize(clean))  # and noise-free
    rae.train()
    assert not rae.autoencoder.encoder.training  # the frozen encoder stays in eval mode
    noisy = rae.denormalize(rae.encode(x, generator=torch.Generator().manual_seed(0)))
    sigma = (noisy - clean).flatten(1).std(1)
    assert (sigma > 0).all() and (sigma < 0.8 * 1.1).all()  # σ = τ U(0, 1) per sample
    assert sigma.std() > 0.05  # a different σ per sample, not one for the batch
    rae.set_noise_tau(0.0)
    assert torch.allclose(rae.encode(x), rae.normalize(clean), atol=1e-6)


# ----------------------------------------------------------------------------- encoders and decoders
def test_timm_encoder_non_square_grid():
    rae = tiny_timm_rae((16, 24))
    x = images(3, (16, 24))
    z = rae.encode(x)
    assert rae.latent_shape == (32, 4, 6) and z.shape == (3, 32, 4, 6)
    assert rae.decode(z).shape == (3, 1, 16, 24)
    # the final LayerNorm has no affine parameters, CLS dropped
    assert rae.autoencoder.encoder.norm.weight is None
    tokens = rae.autoencoder.encoder.forward_features((x + 1) / 2 * 2 - 1)
    assert tokens.shape[1] == 1 + 24


def test_timm_teacher_weights_load_into_the_encoder():
    import timm

    kwargs = {"img_size": (16, 24), "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    rae = tiny_timm_rae((16, 24))
    rae.autoencoder.load_encoder_state_dict(teacher.state_dict())  # its norm affine and class head are dropped
    assert torch.equal(rae.autoencoder.encoder.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    with pytest.raises(KeyError, match="missing"):
        rae.autoencoder.load_encoder_state_dict({"blocks.0.attn.qkv.weight": teacher.blocks[0].attn.qkv.weight})


def test_tokens_not_filling_the_grid_are_refused():
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_grid(torch.zeros(1, 15, 4))
    with pytest.raises(ValueError, match="4x6"):
        tokens_to_grid(torch.zeros(1, 25, 4), (4, 6))
    rae = tiny_timm_rae((16, 16))
    rae.autoencoder.num_prefix_tokens = 0  # an encoder whose CLS token is not declared
    with pytest.raises(ValueError, match="prefix"):
        rae.encode(images(1))


def test_diffusers_autoencoder_rae_folder_loads_and_works(tmp_path):
    ae = AutoencoderRAE(encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=4,
                        encoder_num_hidden_layers=1, encoder_input_size=16, patch_size=2, decoder_hidden_size=32,
                        decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                        latents_mean=[0.1], latents_std=[2.0]).eval()
    ae.save_pretrained(tmp_path / "ae")
    rae = RAE.from_pretrained(tmp_path / "ae")  # a plain diffusers folder: 3-channel images
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = rae.encode(x)
    assert z.shape == (2, 64, 4, 4) and rae.latent_shape == (64, 4, 4)
    with torch.no_grad():
        ref = ae.encode((x + 1) / 2).latent
    assert torch.allclose(z, ref, atol=1e-6)  # the checkpoint's own normalisation is applied, unchanged
    out = rae.decode(z)
    assert out.shape == (2, 3, 8, 8)  # decoder patch 2 on a 4x4 grid
    assert torch.allclose(out, ae.decode(ref).sample * 2 - 1, atol=1e-6)


def test_whole_rae_save_load_round_trip(tmp_path):
    rae = tiny_digits_rae()
    x = images(8)
    rae.fit_latent_stats(x)
    train_decoder(rae, x, steps=2, batch_size=4, noise_tau=0.8)
    rae.save_pretrained(tmp_path / "rae")
    assert not list(tmp_path.glob(".rae.export-*"))  # staging removed
    back = RAE.from_pretrained(tmp_path / "rae")
    assert back.image_channels == 1 and back.noise_tau == 0.8
    assert back.encoder_digest() == rae.encoder_digest()
    assert torch.equal(back.encode(x), rae.encode(x))
    assert torch.equal(back.decode(rae.encode(x)), rae.decode(rae.encode(x)))
    stats = LatentStats.load(tmp_path / "rae" / "latent_stats.safetensors", encoder=back.encoder_digest())
    assert torch.equal(stats.mean, rae.latent_stats().mean)
    timm_rae = tiny_timm_rae()
    timm_rae.save_pretrained(tmp_path / "timm")
    y = images(2, (16, 24))
    assert torch.equal(RAE.from_pretrained(tmp_path / "timm").encode(y), timm_rae.encode(y))


def test_decoder_training_keeps_the_encoder_frozen():
    rae = tiny_digits_rae()
    enc = {k: v.clone() for k, v in rae.autoencoder.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in rae.autoencoder.decoder.state_dict().items()}
    losses = train_decoder(rae, images(16), steps=3, batch_size=8)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(v, rae.autoencoder.encoder.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(v, rae.autoencoder.decoder.state_dict()[k]) for k, v in dec.items())
    assert not rae.training
    with pytest.raises(ValueError, match="raw latents"):
        train_decoder(rae, images(16), steps=1, raw=torch.zeros(3, 64, 8, 8))


def test_mae_pretraining_transplants_into_the_encoder():
    ae = digits_autoencoder(hidden_size=64, num_layers=1, decoder_hidden_size=32, decoder_layers=1, decoder_heads=2)
    before = {k: v.clone() for k, v in ae.encoder.state_dict().items()}
    losses = pretrain_mae_encoder(ae, images(16), steps=3, batch_size=8)
    assert len(losses) == 3
    after = ae.encoder.state_dict()
    assert set(after) == set(before) and ae.encoder.layernorm.weight is None
    assert not torch.equal(after["layers.0.attention.q_proj.weight"],
                           before["layers.0.attention.q_proj.weight"])
    assert not any(p.requires_grad for p in ae.encoder.parameters())


def test_reconstruction_loss_switchable_terms():
    x, y = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert set(ReconstructionLoss()(x, y)) == {"l1", "loss"}
    disc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    loss = ReconstructionLoss(perceptual=lambda a, b: (a - b).pow(2).mean(), discriminator=disc)
    terms = loss(x, y)
    assert set(terms) == {"l1", "perceptual", "adversarial", "loss"}
    assert terms["loss"].item() == pytest.approx((terms["l1"] + terms["perceptual"] + terms["adversarial"]).item())
    assert loss.discriminator_loss(y, x).ndim == 0
    with pytest.raises(ValueError, match="adversarial term is off"):
        ReconstructionLoss().discriminator_loss(y, x)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors(tmp_path):
    rae = tiny_digits_rae()
    with pytest.raises(ValueError, match=r"takes \(B, 64, 8, 8\)"):
        rae.decode(torch.zeros(1, 64, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        rae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="img_size"):
        tiny_timm_rae((16, 24)).encode(images(1, (16, 16)))
    rae.autoencoder.save_pretrained(tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "encoder_type": "clip"}))
    with pytest.raises(ValueError, match="encoder_type 'clip'.*valid encoder types"):
        load_autoencoder(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(KeyError, match="AutoencoderKL"):
        load_autoencoder(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "nothing")
    with pytest.raises(ValueError, match="mode"):
        LatentStats.fit(torch.zeros(4, 2, 2, 2), "x", mode="pixel")


def test_build_rae_command_writes_a_loadable_rae(tmp_path) -> None:
    from difffeat.cli import main
    from difffeat.rae import RAE

    main(["build-rae", "--folder", str(tmp_path / "rae"), "--mae_steps", "1"])
    rae = RAE.from_pretrained(tmp_path / "rae")
    z = rae.encode(torch.zeros(2, 1, 16, 16))
    assert z.shape[0] == 2 and torch.isfinite(z).all()
