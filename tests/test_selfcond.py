"""DDAE++-style self-conditioning on the U-Net and the DiT."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from difffeat.backbones import create_backbone
from difffeat.data import DigitsDataModule
from difffeat.selfcond import SelfConditioning
from difffeat.train import DiffusionModule


def _out(backbone, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, backbone.latent_channels, backbone.latent_size, backbone.latent_size, generator=gen)
    with torch.no_grad():
        return backbone(x, torch.tensor([5, 600]))


@pytest.mark.parametrize("name", ["unet2d-tiny", "dit-digits"])
def test_off_and_zero_init_reproduce_the_plain_model_exactly(name) -> None:
    backbone = create_backbone(name)
    plain = _out(backbone)
    backbone.set_self_conditioning(SelfConditioning(hidden=8, enabled=False))
    assert torch.equal(_out(backbone), plain)
    backbone.set_self_conditioning(SelfConditioning(hidden=8))
    assert torch.equal(_out(backbone), plain)  # zero-initialised output layer
    torch.nn.init.normal_(backbone.selfcond.mlp[-1].weight)
    assert not torch.equal(_out(backbone), plain)
    backbone.set_self_conditioning(None)
    assert torch.equal(_out(backbone), plain)


def test_targets_are_the_later_layers_only() -> None:
    unet = create_backbone("unet2d-tiny").set_self_conditioning(SelfConditioning(hidden=8))
    assert unet.selfcond.source == "mid_block"
    assert all(t.startswith("up_blocks.") for t in unet.selfcond.targets) and len(unet.selfcond.targets) == 4
    dit = create_backbone("dit-digits").set_self_conditioning(SelfConditioning(hidden=8))
    assert dit.selfcond.source == "transformer_blocks.2"
    assert dit.selfcond.targets == [f"transformer_blocks.{i}.norm1.emb" for i in (3, 4, 5)]
    with pytest.raises(ValueError, match="source is its mid_block"):
        create_backbone("unet2d-tiny").set_self_conditioning(SelfConditioning(source="up_blocks.0"))
    with pytest.raises(ValueError, match="nothing to condition"):
        create_backbone("dit-digits").set_self_conditioning(SelfConditioning(source="transformer_blocks.5"))


def test_trained_self_conditioning_is_exported_and_reloaded(tmp_path) -> None:
    L.seed_everything(0)
    module = DiffusionModule("unet2d-tiny", warmup_steps=1, export_dir=str(tmp_path / "m"),
                             self_conditioning=SelfConditioning(hidden=8))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(batch_size=8))
    assert module.backbone.selfcond.mlp[-1].weight.abs().sum() > 0  # it trained
    loaded = create_backbone(tmp_path / "m")
    assert loaded.selfcond is not None
    torch.testing.assert_close(_out(loaded), _out(module.ema), rtol=0, atol=0)
