"""Tests of difffeat.backbones.rae: DiT^DH, its adapter on RAE latents, the RAE encoder as a backbone, the
RAE pipeline folder and the RAE configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from difffeat.backbones import create_backbone
from difffeat.backbones.rae import DiTDHBackbone, DiTDHTransformer2DModel, RAEEncoderBackbone, dit_dh_config
from difffeat.cli import main
from difffeat.extract import FeatureExtractor
from difffeat.rae import RAE, TimmAutoencoderRAE, digits_autoencoder, sample_latents, save_rae_pipeline
from difffeat.readout import GlobalAvg, TokenMean

ROOT = Path(__file__).resolve().parents[2]


def tiny_rae(seed: int = 0) -> RAE:
    """A timm RAE on 16x16 grey images with an 8 x 4 x 4 latent (the size dit-dh-tiny takes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = TimmAutoencoderRAE("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "in_chans": 1,
                                                         "embed_dim": 8, "depth": 1, "num_heads": 2},
                                decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                decoder_intermediate_size=32, patch_size=4)
    rae = RAE(ae, image_channels=1)
    rae.fit_latent_stats(images(16, seed=1))
    return rae.eval()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomise_zero_init(model: torch.nn.Module) -> None:
    """Gives the adaLN-Zero / final-layer weights (zero at init) random values, so every path is live."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("head_layers", [0, 2])
def test_dit_dh_shapes_and_head_conditioning(head_layers):
    model = DiTDHTransformer2DModel(**dit_dh_config((8, 4, 4), 32, 2, 64, head_layers, head_dim=16))
    x, t = torch.randn(3, 8, 4, 4), torch.tensor([10.0, 500.0, 990.0])
    assert model(x, t).sample.shape == (3, 8, 4, 4)
    assert not model(x, t).sample.any()  # zero-initialised output layer
    randomise_zero_init(model)
    out = model(x, t).sample
    out.square().sum().backward()
    # the DiT's blocks get gradients through the head's per-token modulation (or the final layer without head)
    assert model.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    if head_layers:
        assert model.head_blocks[0].modulation.weight.shape == (6 * 64, 32)  # head 64 wide > 8 channels
        # each output token depends on the DiT's token at its own position: perturb one DiT block output
        model.zero_grad()
        handle = model.transformer_blocks[-1].register_forward_hook(lambda m, i, o: o * 0)
        assert not torch.allclose(model(x, t).sample, out)
        handle.remove()


def test_registered_dit_dh_taps_and_bad_names():
    backbone = create_backbone("dit-dh-tiny")
    assert isinstance(backbone, DiTDHBackbone)
    info = backbone.feature_info
    assert [n for n in info if "." not in n or n.count(".") == 1] == ["pos_embed", "transformer_blocks.0",
                                                                       "head_embed", "head_blocks.0"]
    assert info["head_blocks.0"].channels == 64 and info["head_blocks.0"].grid == (4, 4)
    assert info["transformer_blocks.0"].channels == 32
    with pytest.raises(KeyError, match="valid layers"):
        FeatureExtractor(backbone, ["head_blocks.7"], [10])
    with pytest.raises(ValueError, match="RAE gives latents"):
        DiTDHBackbone(backbone.model, backbone.schedule, rae=RAE(digits_autoencoder(hidden_size=64, num_layers=1,
                                                                                  decoder_layers=1), 1))


def test_rae_pipeline_round_trip_extraction_and_sampling(tmp_path):
    rae = tiny_rae()
    backbone = create_backbone("dit-dh-tiny", scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                         "shift": math.sqrt(128 / 4096)})
    randomise_zero_init(backbone.model)
    backbone = DiTDHBackbone(backbone.model, backbone.schedule, rae=rae)
    folder = save_rae_pipeline(backbone.model, {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                "shift": backbone.schedule.shift}, rae, tmp_path / "pipe")
    assert {p.name for p in folder.iterdir()} >= {"transformer", "scheduler", "rae", "model_index.json"}
    loaded = create_backbone(folder)
    assert isinstance(loaded, DiTDHBackbone) and loaded.rae is not None
    assert loaded.spec() == backbone.spec()  # weights, schedule (shift), RAE config and weights
    assert loaded.schedule.shift == pytest.approx(math.sqrt(128 / 4096))
    x = images(4)
    assert torch.equal(loaded.encode(x), rae.encode(x))
    taps = ["transformer_blocks.0", "head_blocks.0"]
    a = FeatureExtractor(backbone, taps, [100, 600], readout=TokenMean())(x, range(4))
    b = FeatureExtractor(loaded, taps, [100, 600], readout=TokenMean())(x, range(4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    z = sample_latents(loaded, 3, steps=4, seed=5)
    assert z.shape == (3, 8, 4, 4) and torch.equal(z, sample_latents(loaded, 3, steps=4, seed=5))
    assert loaded.decode(z).shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="channels"):
        loaded.encode(torch.zeros(1, 3, 16, 16))


def test_rae_encoder_backbone_taps(tmp_path):
    ae = digits_autoencoder(hidden_size=64, num_layers=2, decoder_hidden_size=32, decoder_layers=1, decoder_heads=2)
    rae = RAE(ae, image_channels=1)
    rae.fit_latent_stats(images(8))
    rae.save_pretrained(tmp_path / "rae")
    backbone = create_backbone(tmp_path / "rae")
    assert isinstance(backbone, RAEEncoderBackbone) and backbone.prefix == 1  # MAE: CLS only
    info = backbone.feature_info
    assert info["latent"].kind == "map" and info["latent"].channels == 64 and info["latent"].stride == 2
    layer = backbone.tap_names()[-1]
    assert info[layer].kind == "tokens" and info[layer].grid == (8, 8)  # 64 patch tokens, CLS dropped
    x = images(3)
    feats = FeatureExtractor(backbone, ["latent", layer], [0], readout=GlobalAvg())(x, range(3))
    assert torch.allclose(feats[("latent", 0)], rae.encode(x).mean((2, 3)), atol=1e-6)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    assert not backbone.training and all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())


def test_rae_configs_fast_dev_run(tmp_path):
    tiny_rae().save_pretrained(tmp_path / "rae")
    main(["fit", "--config", str(ROOT / "configs/rae_decoder_digits.yaml"), "--trainer.fast_dev_run", "1",
          "--trainer.enable_progress_bar", "false", "--model.checkpoint", str(tmp_path / "rae"),
          "--model.export_dir", str(tmp_path / "decoded")])
    assert RAE.from_pretrained(tmp_path / "decoded").latent_shape == (8, 4, 4)
    main(["fit", "--config", str(ROOT / "configs/rae_dit_dh_digits.yaml"), "--trainer.fast_dev_run", "1",
          "--trainer.enable_progress_bar", "false", "--model.checkpoint", str(tmp_path / "rae"), "--data.checkpoint",
          str(tmp_path / "rae"), "--model.backbone", "dit-dh-tiny", "--model.export_dir", str(tmp_path / "dit")])
    backbone = create_backbone(tmp_path / "dit")
    assert isinstance(backbone, DiTDHBackbone) and backbone.rae is not None
    assert backbone.schedule.shift == pytest.approx(math.sqrt(8 * 4 * 4 / 4096))  # alpha of the RAE latent
    main(["fit", "--config", str(ROOT / "configs/rae_dit_dh_pixel_digits.yaml"), "--trainer.fast_dev_run", "1",
          "--trainer.enable_progress_bar", "false", "--model.export_dir", str(tmp_path / "pixel")])
    pixel = create_backbone(tmp_path / "pixel")
    assert pixel.rae is None and pixel.schedule.shift == 1.0 and pixel.latent_channels == 1


def test_digits_arms_have_equal_parameters():
    count = {name: sum(p.numel() for p in create_backbone(name).model.parameters())
             for name in ("dit-dh-digits", "dit-dh-digits-narrow", "dit-dh-digits-pixel")}
    assert abs(count["dit-dh-digits-narrow"] / count["dit-dh-digits"] - 1) < 0.01
    assert create_backbone("dit-dh-digits").schedule.shift == pytest.approx(math.sqrt(2))
    head = create_backbone("dit-dh-digits").model
    assert head.head_blocks[0].norm1.normalized_shape[0] > head.config.in_channels  # the head is wider
