"""torchvision detectors on difffeat COCO folders: build, train a few steps, detect, score with torchmetrics."""

from __future__ import annotations

import pytest
import torch

from difffeat.data.coco import CocoDetection, export_scenes
from heads.detectors import DETECTORS, build_detector, coco_datasets, detect, evaluate_map, train_detector


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("det")
    return (export_scenes(tmp / "train", 6, size=64, seed=0, classes=[0, 1], progress=False),
            export_scenes(tmp / "more", 4, size=64, seed=2, classes=[0, 1], progress=False),
            export_scenes(tmp / "odd", 2, size=64, seed=0, classes=[0, 3], progress=False))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_trains_on_a_coco_folder(name, folders) -> None:
    data, categories = coco_datasets(folders[:2])
    assert len(data) == 10 and categories == ["digit0", "circle"]
    model = build_detector(name, len(categories), 64, width=32, seed=0)
    same = build_detector(name, len(categories), 64, width=32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values(),
                                                 strict=True))
    losses = train_detector(model, data, steps=12, batch_size=4, lr=2e-3, warmup=2, progress=False)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    test = CocoDetection(folders[0])
    preds = detect(model, test)
    assert len(preds) == len(test) and all(p["boxes"].shape[1] == 4 for p in preds)
    scores = evaluate_map(preds, test)
    assert 0 <= scores["map"] <= scores["map_50"] <= 1


def test_evaluate_map_ground_truth_is_one_and_shifted_is_lower(folders) -> None:
    test = CocoDetection(folders[0])
    gt = [{"boxes": test[i]["boxes"], "scores": torch.ones(len(test[i]["labels"])), "labels": test[i]["labels"]}
          for i in range(len(test))]
    assert evaluate_map(gt, test) == {"map": pytest.approx(1.0), "map_50": pytest.approx(1.0)}
    shifted = [{**p, "boxes": p["boxes"] + torch.tensor([6.0, 0.0, 6.0, 0.0])} for p in gt]
    assert evaluate_map(shifted, test)["map"] < 0.9
    with pytest.raises(ValueError, match="predictions for"):
        evaluate_map(gt[:-1], test)


def test_bad_inputs(folders) -> None:
    with pytest.raises(KeyError, match="valid"):
        build_detector("yolo", 2)
    with pytest.raises(ValueError, match="one label set"):
        coco_datasets([folders[0], folders[2]])
    with pytest.raises(ValueError, match="at least one"):
        coco_datasets([])
