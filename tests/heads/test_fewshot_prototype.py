"""The training-free prototype baseline: prototypes, its input checks, its evaluation-only module."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from heads.fewshot import FewShotIoU
from heads.fewshot_prototype import PrototypeFewShotModule, PrototypeSegmenter, masked_average


def test_prototypes_segment_by_feature_similarity() -> None:
    # features = the image itself: red objects on a blue background
    def image(box):
        x = torch.zeros(3, 16, 16)
        x[2] = 1
        y0, y1, x0, x1 = box
        x[:, y0:y1, x0:x1] = torch.tensor([1.0, 0, 0])[:, None, None]
        m = torch.zeros(16, 16, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        return x, m

    (s, sm), (q, qm) = image((2, 8, 2, 8)), image((9, 15, 5, 12))
    model = PrototypeSegmenter(lambda x: x)
    logits = model(s[None], sm[None], q[None])
    assert logits.shape == (1, 2, 16, 16)
    assert torch.equal(logits.argmax(1)[0].bool(), qm)


@pytest.mark.parametrize("support_mask,match", [
    (torch.ones(1, 8, 8, dtype=torch.bool), r"do not match the support images"),
    (torch.zeros(1, 16, 16, dtype=torch.bool), r"\[0\] are empty"),
])
def test_bad_supports_fail_before_any_work(support_mask, match) -> None:
    calls = []
    model = PrototypeSegmenter(lambda x: calls.append(1) or x)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(1, 3, 16, 16), support_mask, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="k >= 1"):
        model(torch.zeros(0, 3, 16, 16), torch.zeros(0, 16, 16, dtype=torch.bool), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="query"):
        model(torch.zeros(1, 3, 16, 16), torch.ones(1, 16, 16, dtype=torch.bool), torch.zeros(1, 1, 16, 16))
    assert calls == []


def test_module_logs_the_protocol_scores_over_all_episodes() -> None:
    from difffeat.data.episodes import FewShotDataModule
    module = PrototypeFewShotModule(backbone="unet2d-tiny", layers=["up_blocks.0"], feature_size=16)
    data = FewShotDataModule(fold=0, train_scenes=40, test_scenes=120, test_episodes=7, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.test(module, data, verbose=False)[0]
    expected = FewShotIoU(20)
    for batch in data.test_dataloader():  # 4 batches, the last of one episode
        expected.update(module.predict_masks(batch), batch["query_mask"], batch["class_id"], batch["query_ignore"])
    scores = expected.compute()
    assert logged["test/miou"] == pytest.approx(float(scores["miou"]), abs=1e-6)
    assert logged["test/fbiou"] == pytest.approx(float(scores["fbiou"]), abs=1e-6)


def test_masked_average_weights_by_mask_area() -> None:
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :2, :2] = True  # the top-left feature cell
    assert masked_average(feats, mask).item() == 0.0
    mask[0, :2, 2:3] = True  # half of the next cell
    assert masked_average(feats, mask).item() == pytest.approx(1 / 3)


def test_prototype_module_has_nothing_to_train() -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from difffeat.data.episodes import FewShotDataModule

    module = PrototypeFewShotModule(backbone="unet2d-tiny", layers=["up_blocks.0"], feature_size=8)
    assert sum(p.numel() for p in module.parameters()) > 0
    assert not [n for n, p in module.named_parameters() if p.requires_grad]
    data = FewShotDataModule(fold=0, train_scenes=40, test_scenes=120, train_episodes=2, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, fast_dev_run=1)
    with pytest.raises(MisconfigurationException, match="training_step"):
        trainer.fit(module, data)
