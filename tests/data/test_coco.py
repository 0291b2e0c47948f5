"""COCO folders: scenes exported, read back, scored against themselves by pycocotools; bad inputs refused."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from difffeat.data.coco import (
    ANNOTATIONS,
    IMAGES,
    CocoDetection,
    CocoError,
    SceneDetection,
    clean_boxes,
    export_scenes,
    load_coco,
    write_coco,
)
from difffeat.data.scenes import CLASSES, render_scene


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    return export_scenes(tmp_path_factory.mktemp("coco") / "real", 6, size=32, seed=3, classes=[0, 1, 2],
                         progress=False)


def test_export_matches_scenes(folder) -> None:
    data = load_coco(folder)
    assert [c["name"] for c in data["categories"]] == [CLASSES[c] for c in (0, 1, 2)]
    ds = CocoDetection(folder)
    scenes = SceneDetection(6, size=32, seed=3, classes=[0, 1, 2])
    assert len(ds) == 6 and ds.categories == scenes.categories
    for i in range(6):
        item, ref = ds[i], scenes[i]
        s = render_scene(i, 32, 3, [0, 1, 2])
        assert torch.equal(item["boxes"], torch.from_numpy(s["boxes"]).float())
        assert torch.equal(item["labels"], ref["labels"])
        assert torch.allclose(item["image"], ref["image"], atol=1e-6)  # PNG holds exactly the 8-bit scene
        assert item["image"].shape == (3, 32, 32)


def test_ground_truth_scores_ap_one(folder) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = load_coco(folder)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in data["annotations"]]
    assert len(dets) >= 6
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(folder / ANNOTATIONS))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)
    # and a shifted copy does not: the check can fail
    for d in dets:
        d["bbox"] = [d["bbox"][0] + d["bbox"][2] * 0.6, *d["bbox"][1:]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] < 0.5


def _valid(tmp_path):
    (tmp_path / IMAGES).mkdir(exist_ok=True)
    (tmp_path / IMAGES / "a.png").write_bytes(b"")
    return {"info": {}, "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "circle"}]}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["annotations"][0].update(bbox=[8, 8, 5, 5]), "leaves its 10x10 image"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 3]), "zero-area"),
    (lambda d: d["annotations"][0].update(category_id=7), "has category 7"),
    (lambda d: d["annotations"][0].update(image_id=9), "refers to image 9"),
    (lambda d: d.pop("categories"), "no 'categories' key"),
    (lambda d: d["images"].append(dict(d["images"][0])), "appears twice"),
    (lambda d: d["images"][0].update(file_name="missing.png"), "does not exist"),
])
def test_bad_json_refused_and_nothing_written(tmp_path, edit, message) -> None:
    good = _valid(tmp_path)
    write_coco(tmp_path / ANNOTATIONS, good, tmp_path / IMAGES)
    before = (tmp_path / ANNOTATIONS).read_bytes()
    bad = json.loads(json.dumps(good))
    edit(bad)
    with pytest.raises(CocoError, match=message):
        write_coco(tmp_path / ANNOTATIONS, bad, tmp_path / IMAGES)
    assert (tmp_path / ANNOTATIONS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ANNOTATIONS, IMAGES]  # no temporary left


def test_empty_folder_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a COCO folder"):
        CocoDetection(tmp_path)
    data = _valid(tmp_path)
    data["images"], data["annotations"] = [], []
    write_coco(tmp_path / ANNOTATIONS, data)
    with pytest.raises(CocoError, match="lists no images"):
        CocoDetection(tmp_path)


def test_clean_boxes_clips_and_drops(caplog) -> None:
    boxes = torch.tensor([[-3.0, 2.0, 5.0, 6.0], [4.0, 4.0, 4.0, 9.0], [8.0, 8.0, 20.0, 30.0], [2.0, 2.0, 3.0, 3.0]])
    with caplog.at_level("INFO", logger="difffeat.data.coco"):
        kept, keep = clean_boxes(boxes, 10, 12, "img 0")
    assert keep.tolist() == [True, False, True, True]
    assert kept.tolist() == [[0.0, 2.0, 5.0, 6.0], [8.0, 8.0, 10.0, 12.0], [2.0, 2.0, 3.0, 3.0]]
    assert "clipped 2 box(es)" in caplog.text and "dropped 1 box(es)" in caplog.text
    with pytest.raises(ValueError, match="NaN"):
        clean_boxes(torch.tensor([[np.nan, 0, 1, 1]]), 4, 4)


def test_export_refuses_existing(folder) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        export_scenes(folder, 2, size=32, progress=False)
