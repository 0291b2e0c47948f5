"""DIS baselines: SMP U-Net on an untrained encoder, SMP decoders on the frozen diffusion encoder; benchmark helpers."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat.data.dis import DISDataModule
from heads.dis import DISModule, dis_loss, predict_folder
from heads.dis_baselines import FrozenDiffusionSMPModule, SMPSegmentationModule


def batch(n: int = 2, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 16:48, 20:44] = 1
    edge = (F.max_pool2d(mask, 5, 1, 2) + F.max_pool2d(-mask, 5, 1, 2)).clamp(0, 1)
    return {"image": torch.rand(n, 3, size, size, generator=gen) * 2 - 1, "mask": mask, "edge": edge}


def smp_module(**kwargs) -> SMPSegmentationModule:
    return SMPSegmentationModule(encoder_name="tu-resnet18", decoder_channels=(32, 16, 16, 8, 8), image_size=64,
                                 **kwargs)


@pytest.fixture(scope="module")
def frozen() -> dict[str, FrozenDiffusionSMPModule]:
    torch.manual_seed(0)
    return {d: FrozenDiffusionSMPModule("sd-unet-scenes", decoder=d, decoder_channels=(16, 16, 8, 8),
                                        pyramid_channels=32) for d in ("unet", "fpn")}


def test_smp_baseline_shapes_loss_and_input_checks() -> None:
    module = smp_module()
    assert isinstance(module, DISModule) and module.size_multiple == 32
    b = batch()
    logits = module.logits(b["image"])
    assert logits.shape == (2, 1, 64, 64)
    losses = module.losses(b)
    # the DiffDIS module's loss without the edge term: SMP soft BCE + Dice on the mask logits
    torch.testing.assert_close(losses["loss"], dis_loss({"mask": logits}, b["mask"], edge_weight=0)["loss"])
    p = module.predict(b["image"], flip=True)
    assert p.shape == (2, 1, 64, 64) and float(p.min()) >= 0 and float(p.max()) <= 1
    with pytest.raises(ValueError, match="multiples of 32"):
        module.logits(b["image"][..., :48])
    with pytest.raises(KeyError):
        SMPSegmentationModule(arch="NoSuchArch")


def test_untrained_encoder_has_no_pretrained_weights() -> None:
    torch.manual_seed(0)
    a = smp_module()
    torch.manual_seed(1)
    b = smp_module()
    assert a.hparams.encoder_weights is None
    enc_a, enc_b = dict(a.model.encoder.named_parameters()), dict(b.model.encoder.named_parameters())
    convs = [n for n, p in enc_a.items() if p.ndim == 4]
    # pretrained weights would be the same file whatever the seed: these are random draws
    assert convs and all(not torch.equal(enc_a[n], enc_b[n]) for n in convs)
    norms = [m for m in a.model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
                         and torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)


@pytest.mark.parametrize("decoder", ["unet", "fpn"])
def test_frozen_encoder_is_unchanged_by_a_training_step(frozen, decoder: str) -> None:
    module = frozen[decoder]
    assert module.encoder.strides == [2, 4, 8, 16] and module.size_multiple == 16
    b = batch()
    assert module.logits(b["image"]).shape == (2, 1, 64, 64)
    encoder_ids = {id(p) for p in module.encoder.parameters()}
    opt = module.configure_optimizers()
    assert not encoder_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(not p.requires_grad for p in module.encoder.parameters())
    before = {k: v.clone() for k, v in module.encoder.backbone.model.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.decoder.state_dict().items()}
    module.train()
    assert not module.encoder.backbone.training  # frozen: eval mode whatever train() says
    loss = module.training_step(b, 0)
    loss.backward()
    opt.step()
    after = module.encoder.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(head_before[k], v) for k, v in module.decoder.state_dict().items())
    # the checkpoint holds the decoder and head only, and loads back
    state = module.state_dict()
    assert state and not any(k.startswith("encoder.") for k in state)
    module.load_state_dict(state)


def test_frozen_baseline_refuses_an_unknown_decoder() -> None:
    with pytest.raises(KeyError, match="unet, fpn"):
        FrozenDiffusionSMPModule("sd-unet-scenes", decoder="deeplab")


def test_shared_evaluation_logs_the_dis_suite_per_test_set(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = smp_module(lr=1e-3)
    data = DISDataModule(size=64, batch_size=2, lengths=(4, 2, 2))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        val_check_interval=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert "val/wfm" in trainer.callback_metrics and "val/hce" not in trainer.callback_metrics
    loader = data.test_dataloader()
    trainer.test(module, dataloaders=[loader, loader], verbose=False)
    keys = {k.split("/dataloader_idx")[0] for k in trainer.callback_metrics}
    assert {"test/0/hce", "test/1/hce", "test/0/wfm", "test/1/em_max"} <= keys
    m = trainer.callback_metrics
    assert float(m["test/0/wfm"]) == pytest.approx(float(m["test/1/wfm"]))  # the same set twice


def test_predict_folder_takes_a_baseline(tmp_path: Path) -> None:
    module = smp_module()
    (tmp_path / "im").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "im" / "a.png")
    [path] = predict_folder(module, tmp_path / "im", tmp_path / "pred")
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (50, 40)


# ------------------------------------------------------------------------------ benchmark's pure functions


def test_benchmark_aggregation_and_verdicts() -> None:
    from experiments.dis_benchmark import aggregate, paired_verdict

    agg = aggregate([{"wfm": 0.2, "hce": 10.0}, {"wfm": 0.4, "hce": 20.0}, {"wfm": 0.3}])
    assert set(agg) == {"wfm"}  # a metric missing in one seed is not averaged over the others
    assert agg["wfm"][0] == pytest.approx(0.3) and agg["wfm"][1] == pytest.approx(0.1)  # sample std
    assert aggregate([{"mae": 0.5}])["mae"] == (0.5, 0.0)
    assert paired_verdict([0.5, 0.6], [0.4, 0.5], "wfm")[:2] == ("supported", pytest.approx(0.1))
    assert paired_verdict([5.0, 9.0], [6.0, 8.0], "hce") == ("not supported", 0.0, 1)  # lower is better
    assert paired_verdict([5.0, 7.0], [6.0, 7.5], "hce")[0] == "supported"
    assert paired_verdict([0.5, 0.1], [0.2, 0.3], "wfm")[0] == "mixed"
    with pytest.raises(ValueError, match="paired"):
        paired_verdict([0.1], [0.1, 0.2], "wfm")


def test_benchmark_crop_finds_the_thin_structure_and_cache_key_tracks_settings() -> None:
    from experiments.dis_benchmark import cache_key, thin_crop

    mask = np.zeros((64, 64), bool)
    mask[2:30, 2:30] = True  # a thick block
    mask[50, 20:60] = True  # a 1-px wire
    y, x = thin_crop(mask, 16)
    assert 0 <= y <= 48 and 0 <= x <= 48 and mask[y:y + 16, x:x + 16][:, :].any()
    assert y <= 50 < y + 16 and not mask[y:y + 16, x:x + 16][:2].all()
    args = argparse.Namespace(steps=2, size=64, seeds=[0], out="x")
    key = cache_key("DiffDIS-style", 0, "sd-unet-scenes", args)
    assert key == cache_key("DiffDIS-style", 0, "sd-unet-scenes", argparse.Namespace(steps=2, size=64, seeds=[1],
                                                                                     out="y"))
    assert key != cache_key("DiffDIS-style", 0, "sd-unet-scenes", argparse.Namespace(steps=3, size=64))
    assert key != cache_key("DiffDIS-style", 1, "sd-unet-scenes", args)
    assert key != cache_key("(c) DiffDIS-style, no edge", 0, "sd-unet-scenes", args)


def test_benchmark_summary_table_has_every_split_and_method() -> None:
    from experiments.dis_benchmark import SPLITS, SUMMARY_METRICS, summary_table

    def run(wfm: float) -> dict:
        scores = {m: 0.5 for m in SUMMARY_METRICS} | {"wfm": wfm, "hce": 12.0}
        return {"scores": {s: dict(scores) for s in SPLITS}}

    text = summary_table({"A": [run(0.2), run(0.4)], "B": [run(0.6)]})
    rows = text.splitlines()[2:]
    assert len(rows) == 2 * len(SPLITS)
    assert rows[0].startswith(f"| {SPLITS[0]} | A | ") and rows[-1].startswith(f"| {SPLITS[-1]} | B | ")
    assert "0.300 ± 0.141" in rows[0]  # wfm mean ± sample std over A's two seeds
    assert "12.0 ± 0.0" in rows[0] and "hce ↓" in text and "wfm ↑" in text
