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


# ----------------------------------------------------------------- atomic export
def _export(model: int | torch.nn.Module, folder, tag: str):
    """Saves a tiny U-Net (a module, or the seed of a fresh one) with ``tag`` in its ``difffeat.json``."""
    from difffeat.train import SCHEDULERS, save_pipeline

    if not isinstance(model, torch.nn.Module):
        model = create_backbone("unet2d-tiny", seed=model).model
    return save_pipeline(model, SCHEDULERS["eps"], folder, extra={"tag": tag})


def _digest_and_tag(folder) -> tuple[str, str]:
    """The weights and the ``difffeat.json`` of a folder: a complete export has both from one save."""
    return (create_backbone(folder).weights_digest(),
            json.loads((folder / "difffeat.json").read_text())["tag"])


def test_an_export_leaves_another_exports_temporary_folder_alone(tmp_path) -> None:
    # an export in progress elsewhere (another process, the fixed-name scheme's ``.tmp``) must survive
    for name in ("model.tmp", ".model.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "in-progress").write_text("")
    _export(0, tmp_path / "model", "a")
    _export(1, tmp_path / "model", "b")  # in sequence: the second replaces the first
    assert (tmp_path / "model.tmp" / "in-progress").exists() and (tmp_path / ".model.tmp" / "in-progress").exists()
    assert _digest_and_tag(tmp_path / "model") == (create_backbone("unet2d-tiny", seed=1).weights_digest(), "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp", "model", "model.tmp"]


def test_concurrent_exports_to_one_folder_leave_one_complete_model(tmp_path, monkeypatch) -> None:
    import threading

    from diffusers import ModelMixin

    # both exports are held after writing their weights, so their remaining steps interleave
    barrier = threading.Barrier(2, timeout=30)
    save = ModelMixin.save_pretrained

    def held(self, *args, **kwargs):
        save(self, *args, **kwargs)
        barrier.wait()

    monkeypatch.setattr(ModelMixin, "save_pretrained", held)
    errors = []
    # built before the threads start: a backbone's seeded init uses the global generator
    models = {tag: create_backbone("unet2d-tiny", seed=s).model for s, tag in ((0, "a"), (1, "b"))}

    def run(tag: str) -> None:
        try:
            _export(models[tag], tmp_path / "model", tag)
        except BaseException as err:  # a thread's error would otherwise only be printed
            errors.append(err)

    threads = [threading.Thread(target=run, args=(tag,)) for tag in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {(create_backbone("unet2d-tiny", seed=s).weights_digest(), tag) for s, tag in ((0, "a"), (1, "b"))}
    assert _digest_and_tag(tmp_path / "model") in expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("crash", [OSError("disk gone"), KeyboardInterrupt()])
def test_a_crash_while_renaming_the_new_model_in_keeps_the_old_one(tmp_path, monkeypatch, crash) -> None:
    import os
    from pathlib import Path

    folder = tmp_path / "model"
    _export(0, folder, "old")
    old = _digest_and_tag(folder)
    replace, rename = os.replace, Path.rename
    calls = {"n": 0}

    def crash_once(dst) -> None:
        if Path(dst) == folder and calls["n"] == 0:  # the rename that puts the new model in place
            calls["n"] += 1
            raise crash

    def fake_replace(src, dst, *args, **kwargs):
        crash_once(dst)
        return replace(src, dst, *args, **kwargs)

    def fake_rename(self, dst):
        crash_once(dst)
        return rename(self, dst)

    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(Path, "rename", fake_rename)
    with pytest.raises(type(crash)):
        _export(1, folder, "new")
    assert calls["n"] == 1
    monkeypatch.undo()
    assert _digest_and_tag(folder) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ----------------------------------------------------------------- EMA and learning-rate schedule
def test_ema_follows_the_warm_up_formula_step_by_step() -> None:
    module = DiffusionModule("dit-digits", ema_decay=0.3)  # the cap is reached within the steps below
    backbone_buffers = dict(module.backbone.named_buffers())
    reference = [p.detach().clone() for p in module.ema.parameters()]
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 7):
        with torch.no_grad():  # stand-in for an optimiser step
            for p in module.backbone.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
            backbone_buffers["model.pos_embed.pos_embed"].add_(1.0)
        module.update_ema(n)
        decay = min(0.3, (1 + n) / (10 + n))  # the formula this module has always used
        reference = [r + (1 - decay) * (p.detach() - r) for r, p in zip(reference, module.backbone.parameters(),
                                                                         strict=True)]
        for r, p in zip(reference, module.ema.parameters(), strict=True):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
        for name, b in module.ema.named_buffers():  # buffers are copied, not averaged
            assert torch.equal(b, backbone_buffers[name])


def test_learning_rate_follows_diffusers_cosine_schedule_with_warmup() -> None:
    from diffusers.optimization import get_cosine_schedule_with_warmup

    module = DiffusionModule("unet2d-tiny", lr=1e-3, warmup_steps=3)
    module.trainer = type("Trainer", (), {"estimated_stepping_batches": 10})()  # what the schedule reads
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), 3, 10)
    for _ in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        opt.step()
        sched.step()
        reference.optimizer.step()
        reference.step()
