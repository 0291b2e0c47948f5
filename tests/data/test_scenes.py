"""The generated scene benchmark: determinism and consistency of its annotations."""

from __future__ import annotations

import hashlib

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


@pytest.mark.parametrize("size", [32, 64, 200])
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


@pytest.mark.parametrize("kwargs,match", [({"size": 16}, r"\[32, 512\]"), ({"classes": [20]}, "subset"),
                                          ({"classes": []}, "subset"), ({"length": 0}, "length")])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SceneDataset(**kwargs)


def test_default_scenes_are_version_1_bit_for_bit() -> None:
    # sha256 of render_scene(0 … 4, 64, seed=0), every array, from the generator before the multi-object variant
    h = hashlib.sha256()
    for i in range(5):
        s = render_scene(i, 64, seed=0)
        for k in sorted(s):
            h.update(s[k].tobytes())
    assert h.hexdigest() == "46a0f902bf2ddd7f5a7277de24b2323ad938705a7b32b712dde22024cb4d25a4"
    assert SceneDataset(3, 64).fingerprint == "scenes-v1:3:64:0:None:4"
    assert SceneDataset(3, 64, textured=True).fingerprint.startswith("scenes-v2:3:64:0:None:4:")


def test_multi_object_variant_holds_2_to_4_visible_objects_of_distinct_classes() -> None:
    pool = list(range(5, 20))
    counts = []
    for index in range(40):
        a = render_scene(index, 64, 1, pool, 4, min_objects=2, distinct=True, textured=True)
        b = render_scene(index, 64, 1, pool, 4, min_objects=2, distinct=True, textured=True)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        labels = a["labels"].tolist()
        counts.append(len(labels))
        assert 2 <= len(labels) <= 4 and len(set(labels)) == len(labels) and set(labels) <= set(pool)
        for m, cls in zip(a["masks"], labels, strict=True):
            assert m.sum() >= 8 and (a["semantic"][m] == cls + 1).all()
        assert ((a["semantic"] > 0) == a["masks"].any(0)).all()
    assert set(counts) == {2, 3, 4}


def test_colour_and_texture_are_random_per_instance() -> None:
    """Same class, many instances: the mean colour varies as much as across classes; textured objects are not
    flat (their within-object spread is larger than with the flat colour of version 1)."""
    per_class: dict[int, list[np.ndarray]] = {}
    spread = {False: [], True: []}
    for textured in (False, True):
        for index in range(60):
            s = render_scene(index, 64, 2, [0, 1, 4, 5], 4, min_objects=2, distinct=True, textured=textured)
            for m, cls in zip(s["masks"], s["labels"], strict=True):
                pixels = s["image"][:, m]
                spread[textured].append(pixels.std(1).mean())
                if textured:
                    per_class.setdefault(int(cls), []).append(pixels.mean(1))
    means = {c: np.stack(v) for c, v in per_class.items()}
    overall = np.concatenate(list(means.values())).std(0).mean()
    for c, v in means.items():
        assert len(v) >= 10 and v.std(0).mean() > 0.6 * overall, c  # colour says nothing about the class
        assert abs(v.mean() - np.concatenate(list(means.values())).mean()) < 0.1, c
    assert np.mean(spread[True]) > 1.5 * np.mean(spread[False])


def test_bad_variant_arguments() -> None:
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        render_scene(0, 64, min_objects=5, max_objects=4)
    with pytest.raises(ValueError, match="distinct classes need as many classes"):
        render_scene(0, 64, classes=[3], min_objects=2, distinct=True)
    one = render_scene(0, 64, classes=[3, 4], max_objects=4, distinct=True)
    assert len(one["labels"]) <= 2  # at most one object per class


def test_scene_datamodule_serves_the_variant_when_asked() -> None:
    from difffeat.data.scenes import SceneDataModule

    plain = SceneDataModule(length=4, batch_size=2).train_dataloader().dataset.scenes
    assert plain.fingerprint.startswith("scenes-v1:")  # the pretraining scenes are unchanged by default
    loader = SceneDataModule(length=4, batch_size=2, min_objects=2, distinct=True, textured=True).train_dataloader()
    scenes = loader.dataset.scenes
    assert scenes.fingerprint.startswith("scenes-v2:") and len(scenes[0]["labels"]) >= 2
    assert next(iter(loader))["image"].shape == (2, 3, 64, 64)


def test_small_scenes_are_the_double_size_scene_reduced() -> None:
    for index in range(8):
        small = render_scene(index, 32, 5, min_objects=2, distinct=True, textured=True)
        big = render_scene(index, 64, 5, min_objects=2, distinct=True, textured=True)
        assert len(small["labels"]) >= 2
        np.testing.assert_allclose(small["image"], big["image"].reshape(3, 32, 2, 32, 2).mean((2, 4)), atol=1e-6)
        assert set(small["labels"]) <= set(big["labels"])
        assert not small["masks"].sum(0).max() > 1  # one owner per pixel
        for m, cls in zip(small["masks"], small["labels"], strict=True):
            big_m = big["masks"][list(big["labels"]).index(cls)].reshape(32, 2, 32, 2).mean((1, 3))
            assert (big_m[m] >= 0.5).all()  # a kept pixel was at least half this object
            assert (small["semantic"][m] == cls + 1).all()


def test_cached_scenes_are_served_as_copies() -> None:
    cached, plain = SceneDataset(3, 32, cache=True, min_objects=2), SceneDataset(3, 32, min_objects=2)
    first = cached[1]
    first["image"].zero_()
    first["semantic"].fill_(7)
    again = cached[1]
    assert torch.equal(again["image"], plain[1]["image"]) and torch.equal(again["semantic"], plain[1]["semantic"])
