"""FrozenFeatureModule: frozen backbone, head-only optimizer and checkpoint, online or stored features."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from difffeat.data import DigitsDataModule, DigitsDataset, StoreDataModule
from difffeat.predict import ExtractionModule, extract_to_store
from heads.classification import LinearProbeModule

QUIET = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}


class _Digits(DigitsDataset):
    """120 digits with a train/test ``split`` (the first 80 train; the fingerprint hashes the images)."""

    def __init__(self) -> None:
        super().__init__("test")
        self.images, self.labels = self.images[:120], self.labels[:120]

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "split": int(i >= 80)}


def _fit(module: L.LightningModule, data: L.LightningDataModule, tmp_path, steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, data)
    return trainer


def test_online_head_trains_only_the_head_and_saves_only_the_head(tmp_path) -> None:
    L.seed_everything(0)
    module = LinearProbeModule("unet2d-tiny", ["mid_block"], [10], num_classes=10, lr=0.05)
    backbone = module.extractor.backbone
    before = {k: v.clone() for k, v in backbone.state_dict(keep_vars=False).items()}
    head = module.head.weight.clone()
    trainer = _fit(module, DigitsDataModule(batch_size=32), tmp_path)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # weights and buffers
    assert not backbone.training and not torch.equal(head, module.head.weight)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.head.parameters()}
    trainer.save_checkpoint(tmp_path / "head.ckpt")
    saved = torch.load(tmp_path / "head.ckpt", weights_only=False)["state_dict"]
    assert saved and not [k for k in saved if k.startswith("extractor.")]
    fresh = LinearProbeModule("unet2d-tiny", ["mid_block"], [10], num_classes=10)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.head.weight, module.head.weight)


def test_backbone_is_put_back_in_eval_every_epoch() -> None:
    module = LinearProbeModule("unet2d-tiny", ["mid_block"], [10])
    module.train()
    module.extractor.backbone.train()  # what a careless callback could do
    module.on_train_epoch_start()
    assert not module.extractor.backbone.training


def test_head_trains_from_a_store_like_from_the_backbone(tmp_path) -> None:
    data = _Digits()
    extract_to_store(ExtractionModule("unet2d-tiny", ["mid_block"], [10]), data, tmp_path / "store",
                     shard_size=32, trainer=QUIET)
    stored = LinearProbeModule(store=str(tmp_path / "store"), num_classes=10)
    assert stored.extractor is None and stored.feature_names == ["mid_block@t10"]
    online = LinearProbeModule("unet2d-tiny", ["mid_block"], [10], num_classes=10)
    assert stored.head.in_features == online.head.in_features
    batch = {"image": data.images[:4], "index": torch.arange(4)}
    feats = next(iter(torch.utils.data.DataLoader(
        StoreDataModule(str(tmp_path / "store")).val_dataloader().dataset, batch_size=4)))
    assert torch.equal(online.vector({"image": data.images[80:84], "index": torch.arange(80, 84)}),
                       stored.vector(feats))
    L.seed_everything(0)
    head = stored.head.weight.clone()
    _fit(stored, StoreDataModule(str(tmp_path / "store"), batch_size=16), tmp_path, steps=6)
    assert not torch.equal(head, stored.head.weight)
    del batch


def test_feature_source_must_be_one() -> None:
    with pytest.raises(ValueError, match="exactly one feature source"):
        LinearProbeModule()
    with pytest.raises(ValueError, match="exactly one feature source"):
        LinearProbeModule("unet2d-tiny", ["mid_block"], [10], store="somewhere")
