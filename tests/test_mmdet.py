"""mmdet on difffeat COCO folders: its CocoMetric agrees with torchmetrics on the same predictions; the runner trains.

Skipped only when mmdet cannot be imported (mmdet 3.3 needs mmcv < 2.2 with compiled ops: `make install`
installs the prebuilt wheel from ../shared/wheels/ when it is there; ../shared/wheels/README.md says how to
build it otherwise).
"""

from __future__ import annotations

import pytest
import torch

try:
    import mmdet  # noqa: F401
    from mmcv.ops import nms  # noqa: F401  (the compiled ops mmdet's heads call)
except Exception as err:  # ImportError, or mmcv without its compiled ops
    pytest.skip(f"mmdet cannot be imported ({err}); install the mmcv 2.1 wheel from ../shared/wheels/ "
                f"(see ../shared/wheels/README.md)", allow_module_level=True)

from difffeat.data.coco import CocoDetection, export_scenes
from experiments.mmdet_train import coco_metric, configure, train_and_test
from heads.detectors import evaluate_map


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("mm")
    return (export_scenes(tmp / "train", 8, size=64, seed=0, classes=[0, 1, 2], progress=False),
            export_scenes(tmp / "test", 10, size=64, seed=7, classes=[0, 1, 2], progress=False))


def _noisy_predictions(test: CocoDetection, seed: int) -> list[dict[str, torch.Tensor]]:
    """Ground truth jittered, some labels wrong, random scores, plus false positives: a realistic mix."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(test)):
        item = test[i]
        boxes = item["boxes"] + torch.randn(item["boxes"].shape, generator=gen) * 3
        labels = item["labels"].clone()
        flip = torch.rand(len(labels), generator=gen) < 0.2
        labels[flip] = (labels[flip] + 1) % 3
        extra = torch.rand(3, 2, generator=gen) * 40
        fp = torch.cat([extra, extra + 5 + torch.rand(3, 2, generator=gen) * 20], 1)
        boxes = torch.cat([boxes, fp]).clamp(0, 64)
        labels = torch.cat([labels, torch.randint(3, (3,), generator=gen)])
        out.append({"boxes": boxes, "scores": torch.rand(len(labels), generator=gen), "labels": labels})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmdet_and_torchmetrics_agree(folders, seed) -> None:
    test = CocoDetection(folders[1])
    preds = _noisy_predictions(test, seed)
    tm, mm = evaluate_map(preds, test), coco_metric(folders[1], preds)
    assert 0.05 < tm["map"] < 0.95  # neither trivial nor perfect, so agreement means something
    assert abs(tm["map"] - mm["map"]) < 0.005 and abs(tm["map_50"] - mm["map_50"]) < 0.005
    perfect = [{"boxes": test[i]["boxes"], "scores": torch.ones(len(test[i]["labels"])),
                "labels": test[i]["labels"]} for i in range(len(test))]
    assert coco_metric(folders[1], perfect)["map"] == pytest.approx(1.0)


def test_config_takes_classes_from_the_json(folders, tmp_path) -> None:
    cfg = configure([folders[0], folders[0]], folders[1], tmp_path, iters=7)
    assert cfg.model.bbox_head.num_classes == 3
    assert [d.metainfo["classes"] for d in cfg.train_dataloader.dataset.datasets] == [("digit0", "circle",
                                                                                        "digit1")] * 2
    assert cfg.test_dataloader.dataset.metainfo["classes"] == ("digit0", "circle", "digit1")
    assert cfg.train_cfg.max_iters == 7
    other = export_scenes(tmp_path / "other", 2, size=64, classes=[0, 3], progress=False)
    with pytest.raises(ValueError, match="different categories"):
        configure([folders[0], other], folders[1], tmp_path)


def test_runner_trains_and_tests(folders, tmp_path) -> None:
    result = train_and_test([folders[0]], folders[1], tmp_path / "work", iters=4, batch_size=4)
    assert set(result) == {"map", "map_50"} and 0 <= result["map"] <= result["map_50"] <= 1
    assert list((tmp_path / "work").glob("iter_4.pth"))
