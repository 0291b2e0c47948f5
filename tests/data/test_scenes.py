"""The generated scene benchmark: determinism and consistency of its annotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difffeat.data.scenes import CLASSES, SHAPES, SceneDataset, fold_classes, render_scene


def test_twenty_classes_in_four_mixed_folds() -> None:
    assert len(CLASSES) == 20 and len(SHAPES) >= 10
    folds = [fold_classes(f) for f in range(4)]
    assert sorted(c for f in folds for c in f) == list(range(20))
    for f in folds:
        names = [CLASSES[c] for c in f]
        assert any(n.startswith("digit") for n in names) and any(n in SHAPES for n in names)
    with pytest.raises(ValueError, match="fold"):
        fold_classes(4)


@pytest.mark.parametrize("size", [64, 200])
def test_scenes_are_deterministic_and_consistent(size) -> None:
    for index in range(6):
        a, b = render_scene(index, size, seed=3), render_scene(index, size, seed=3)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert a["image"].shape == (3, size, size) and a["image"].min() >= 0 and a["image"].max() <= 1
        n = len(a["labels"])
        assert a["masks"].shape == (n, size, size) and a["boxes"].shape == (n, 4)
        assert not (a["masks"].sum(0) > 1).any()  # visible parts do not overlap
        for m, cls, (x0, y0, x1, y1) in zip(a["masks"], a["labels"], a["boxes"], strict=True):
            assert (a["semantic"][m] == cls + 1).all()
            assert m[y0:y1, x0:x1].sum() == m.sum()  # the box holds the whole mask
        assert ((a["semantic"] > 0) == a["masks"].any(0)).all()
        assert not (a["edges"] & (a["semantic"] == 0)).any()  # edges lie on objects
    assert not np.array_equal(render_scene(0, 64, seed=3)["image"], render_scene(0, 64, seed=4)["image"])


def test_class_subsets_and_dataset_items() -> None:
    ds = SceneDataset(length=5, size=64, classes=fold_classes(2))
    for i in range(5):
        item = ds[i]
        assert set(item["labels"].tolist()) <= set(fold_classes(2))
        assert item["image"].dtype == torch.float32 and item["image"].min() >= -1 and item["index"] == i
    with pytest.raises(IndexError):
        ds[5]


@pytest.mark.parametrize("kwargs,match", [({"size": 32}, r"\[64, 512\]"), ({"classes": [20]}, "subset"),
                                          ({"classes": []}, "subset"), ({"length": 0}, "length")])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SceneDataset(**kwargs)
