"""PASCAL-5i / COCO-20i readers on tiny trees written here."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.data.episodes import FewShotEpisodes
from difffeat.data.fss import coco20i, fold_class_ids, pascal5i


def _write(image_path, mask_path, value: int, size=(12, 10)) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 200, np.uint8)).save(image_path)
    mask = np.zeros(size, np.uint8)
    mask[2:6, 3:7] = value
    mask[6, 3:7] = 255  # PASCAL's boundary band
    Image.fromarray(mask).save(mask_path)


def test_pascal_layout(tmp_path) -> None:
    names = ["2007_000001", "2007_000002", "2007_000003"]
    for n in names:
        _write(tmp_path / "VOC2012/JPEGImages" / f"{n}.jpg", tmp_path / "VOC2012/SegmentationClassAug" / f"{n}.png", 2)
    split = tmp_path / "splits/pascal/val/fold0.txt"
    split.parent.mkdir(parents=True)
    split.write_text("".join(f"{n}__02\n" for n in names))
    data = pascal5i(tmp_path, fold=0, size=16)
    assert len(data) == 3 and fold_class_ids("pascal", 0) == [0, 1, 2, 3, 4]
    item = data[0]
    assert item["image"].shape == (3, 16, 16) and item["labels"].tolist() == [1]
    assert item["ignore"].any() and set(item["semantic"].unique().tolist()) == {0, 2}
    episode = FewShotEpisodes(data, [1], shots=2, episodes=3)[0]
    assert episode["query_mask"].any() and episode["support"].shape == (2, 3, 16, 16)


def test_pascal_bad_split_line(tmp_path) -> None:
    split = tmp_path / "splits/pascal/val/fold1.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2007_000001-02\n")
    with pytest.raises(ValueError, match=r"fold1.txt:1: '2007_000001-02'"):
        pascal5i(tmp_path, fold=1)
    with pytest.raises(FileNotFoundError, match="fold2.txt not found"):
        pascal5i(tmp_path, fold=2)


def test_coco_layout_and_safe_split_files(tmp_path) -> None:
    names = ["train2014/COCO_train2014_000000000009.jpg", "train2014/COCO_train2014_000000000025.jpg"]
    for n in names:
        _write(tmp_path / "COCO2014" / n, tmp_path / "COCO2014/annotations" / n.replace(".jpg", ".png"), 5)
    split = tmp_path / "splits/coco/trn/fold0.pkl"
    split.parent.mkdir(parents=True)
    split.write_bytes(pickle.dumps({4: names}))
    data = coco20i(tmp_path, fold=0, split="trn", size=8)
    assert len(data) == 2 and data[1]["labels"].tolist() == [4]
    assert fold_class_ids("coco", 1)[:3] == [1, 5, 9]

    split.write_bytes(pickle.dumps({4: [torch.nn.Identity]}))  # anything that needs a class lookup
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        coco20i(tmp_path, fold=0, split="trn")


def test_missing_files_are_named(tmp_path) -> None:
    split = tmp_path / "splits/pascal/val/fold0.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2007_000009__01\n")
    with pytest.raises(FileNotFoundError, match="2007_000009.jpg"):
        pascal5i(tmp_path, fold=0)


def test_ignore_pixels_reach_the_metric_and_count_in_neither_intersection_nor_union(tmp_path) -> None:
    """HSNet's evaluation: pixels marked 255 are removed from both prediction and ground truth."""
    import lightning as L
    from torch.utils.data import DataLoader

    from heads.fewshot import FewShotModule

    names = ["2007_000001", "2007_000002"]
    for n in names:  # 8 x 8: object rows 2-5 x cols 3-6 (16 px), boundary row 6 x cols 3-6 (4 px)
        _write(tmp_path / "VOC2012/JPEGImages" / f"{n}.jpg", tmp_path / "VOC2012/SegmentationClassAug" / f"{n}.png",
               2, size=(8, 8))
    split = tmp_path / "splits/pascal/val/fold0.txt"
    split.parent.mkdir(parents=True)
    split.write_text("".join(f"{n}__02\n" for n in names))
    episodes = FewShotEpisodes(pascal5i(tmp_path, fold=0, size=8), [1], shots=1, episodes=1)
    item = episodes[0]
    band = torch.zeros(8, 8, dtype=torch.bool)
    band[6, 3:7] = True
    assert torch.equal(item["query_ignore"], band) and not (item["query_mask"] & band).any()

    class Predicted(FewShotModule):
        def predict_masks(self, batch):  # the object, its boundary band, and one false positive at (0, 0)
            pred = batch["query_mask"] | band
            pred[:, 0, 0] = True
            return pred

    module = Predicted()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.test(module, DataLoader(episodes, batch_size=1), verbose=False)[0]
    # foreground: I = 16, U = 16 + 1 (the band is ignored; counted it would give U = 21)
    # background over the 60 valid pixels: prediction 43, ground truth 44, I = 43, U = 44
    assert logged["test/miou"] == pytest.approx(16 / 17)
    assert logged["test/fbiou"] == pytest.approx((16 / 17 + 43 / 44) / 2)
