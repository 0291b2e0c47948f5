"""DiffusionModule: a few DDPM steps, EMA, export in diffusers format, reload as a backbone."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from diffusers import DDPMPipeline

from difffeat.backbones import create_backbone
from difffeat.data import DigitsDataModule
from difffeat.train import DiffusionModule


def test_trains_exports_and_reloads(tmp_path) -> None:
    L.seed_everything(0)
    module = DiffusionModule("unet2d-tiny", lr=1e-3, warmup_steps=2, export_dir=str(tmp_path / "model"))
    before = [p.clone() for p in module.backbone.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.backbone.parameters(), strict=True))
    # EMA lags the raw weights but moved away from the init
    ema = list(module.ema.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, ema, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(module.backbone.parameters(), ema, strict=True))

    loaded = create_backbone(tmp_path / "model")
    for a, b in zip(loaded.model.parameters(), module.ema.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (tmp_path / "model" / "model_index.json").exists()
    assert not (tmp_path / "model.tmp").exists()
    pipe = DDPMPipeline.from_pretrained(tmp_path / "model")
    gen = torch.Generator().manual_seed(0)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=gen).images
    assert images.shape == (1, 16, 16, 1)


def test_v_objective_and_bad_objective() -> None:
    module = DiffusionModule("unet2d-tiny", objective="v")
    assert module.scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="objective"):
        DiffusionModule("unet2d-tiny", objective="x0")


def test_flow_objective_trains_a_dit_and_reloads_with_its_schedule(tmp_path) -> None:
    from difffeat.noise import FlowSchedule

    L.seed_everything(0)
    module = DiffusionModule("dit-digits", objective="flow", warmup_steps=1, export_dir=str(tmp_path / "dit"))
    assert isinstance(module.backbone.schedule, FlowSchedule)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(batch_size=8))
    loaded = create_backbone(tmp_path / "dit")
    assert type(loaded).__name__ == "DiTBackbone" and isinstance(loaded.schedule, FlowSchedule)
    assert (tmp_path / "dit" / "transformer" / "config.json").exists()
    for a, b in zip(loaded.model.parameters(), module.ema.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_flow_batch_is_the_linear_interpolant() -> None:
    from difffeat.train import noised_batch

    module = DiffusionModule("unet2d-tiny", objective="flow")
    x0 = torch.randn(6, 1, 16, 16)
    gen = torch.Generator().manual_seed(0)
    x_t, t, target = noised_batch(module, x0, gen)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    s = (torch.rand(6, generator=gen) * 1000).double() / 1000
    assert bool(((t >= 0) & (t < 1000)).all()) and t.dtype.is_floating_point
    torch.testing.assert_close(x_t, ((1 - s).view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise).float())
    torch.testing.assert_close(target, noise - x0)


def test_periodic_export_saves_loadable_ema_checkpoints(tmp_path) -> None:
    from difffeat.train import PeriodicExport

    L.seed_everything(0)
    module = DiffusionModule("unet2d-tiny", warmup_steps=1, export_dir=str(tmp_path / "m"))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[PeriodicExport(2)])
    trainer.fit(module, DigitsDataModule(batch_size=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-step2", "m-step4"]
    assert json.loads((tmp_path / "m-step2" / "difffeat.json").read_text())["global_step"] == 2
    assert create_backbone(tmp_path / "m-step4").weights_digest() == create_backbone(tmp_path / "m").weights_digest()
    with pytest.raises(ValueError, match="every_n_steps"):
        PeriodicExport(0)


def test_a_pixel_space_condition_unet_trains_on_scenes_and_reloads_with_its_condition(tmp_path) -> None:
    from difffeat.data.scenes import SceneDataModule

    L.seed_everything(0)
    module = DiffusionModule("sd-unet-scenes", lr=1e-3, warmup_steps=1, export_dir=str(tmp_path / "model"))
    module.backbone.encoder_hidden_states.normal_()  # a non-trivial fixed condition must survive the export
    module.ema.encoder_hidden_states.copy_(module.backbone.encoder_hidden_states)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    data = SceneDataModule(length=8, batch_size=4)
    trainer.fit(module, data)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and set(batch) == {"image", "index"}
    loaded = create_backbone(tmp_path / "model")
    assert torch.equal(loaded.encoder_hidden_states, module.ema.encoder_hidden_states)
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), module.ema(x, t))
