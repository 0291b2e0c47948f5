"""DIS data: the DIS5K / folder reader, its edge cache and refusals, the generated scenes, the datamodule."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage.morphology import dilation, erosion, footprint_rectangle

import difffeat.data.dis as dis
from difffeat.data.dis import (
    DISDataModule,
    DISFileError,
    DISFolder,
    DISScenes,
    dis5k_splits,
    edge_from_mask,
    read_mask,
    render_dis_scene,
)


def _mask(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A blob with a 1-px wire, 0 / 255."""
    yy, xx = np.mgrid[0:h, 0:w]
    m = (yy - h / 2) ** 2 / (h / 4) ** 2 + (xx - w / 3) ** 2 / (w / 5) ** 2 <= 1
    m[h // 2, w // 3:w - 2] = True
    m |= np.random.default_rng(seed).random((h, w)) < 0.01
    return m.astype(np.uint8) * 255


def _pair(split: Path, stem: str, h: int, w: int, colour=(200, 40, 90), seed: int = 0) -> np.ndarray:
    (split / "im").mkdir(parents=True, exist_ok=True)
    (split / "gt").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(split / "im" / f"{stem}.jpg", quality=95)
    m = _mask(h, w, seed)
    Image.fromarray(m).save(split / "gt" / f"{stem}.png")
    return m


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "DIS5K"
    _pair(root / "DIS-TR", "a", 30, 40)
    _pair(root / "DIS-TR", "b", 36, 28, colour=(10, 250, 128), seed=1)
    _pair(root / "DIS-VD", "c", 32, 32)
    _pair(root / "DIS-TE1", "d", 24, 40)
    return root


def test_dis5k_tree_reads_back(tree: Path) -> None:
    assert list(dis5k_splits(tree)) == ["DIS-TR", "DIS-VD", "DIS-TE1"]
    ds = DISFolder(tree / "DIS-TR")
    assert len(ds) == 2 and ds.names == ["a", "b"]
    item = ds[1]
    assert item["name"] == "b" and item["index"] == 1
    assert item["image"].shape == (3, 36, 28) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    expected = torch.tensor([10, 250, 128]) / 127.5 - 1
    assert torch.allclose(item["image"].mean((1, 2)), expected, atol=0.05)  # JPEG, so approximately
    written = np.asarray(Image.open(tree / "DIS-TR" / "gt" / "b.png")) >= 128
    assert item["mask"].shape == (1, 36, 28) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert np.array_equal(item["mask"][0].numpy().astype(bool), written)
    assert np.array_equal(item["edge"][0].numpy().astype(bool), edge_from_mask(written))

    resized = DISFolder.dis5k(tree, "DIS-TR", size=16)[0]
    assert resized["image"].shape == (3, 16, 16) and resized["mask"].shape == resized["edge"].shape == (1, 16, 16)
    assert set(resized["mask"].unique().tolist()) <= {0.0, 1.0} and resized["mask"].sum() > 0
    nearest = DISFolder(tree / "DIS-TR", size=(20, 24), mask_resize="nearest")[0]
    assert nearest["mask"].shape == (1, 20, 24) and set(nearest["mask"].unique().tolist()) == {0.0, 1.0}

    with pytest.raises(FileNotFoundError, match="DIS5K root"):
        DISFolder(tree)
    with pytest.raises(KeyError, match="DIS-TE4"):
        DISFolder.dis5k(tree, "DIS-TE4")


def test_explicit_image_and_mask_dirs(tmp_path: Path) -> None:
    m = _pair(tmp_path / "x", "p", 20, 20)
    (tmp_path / "x" / "im").rename(tmp_path / "photos")
    (tmp_path / "x" / "gt").rename(tmp_path / "labels")
    ds = DISFolder(image_dir=tmp_path / "photos", mask_dir=tmp_path / "labels")
    assert np.array_equal(ds[0]["mask"][0].numpy() > 0, m >= 128)
    assert (tmp_path / "labels_edge" / "p.png").exists()  # the cache sits beside the masks


def test_edge_cache_is_written_once_and_reused(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = DISFolder(tree / "DIS-TR")
    cached = tree / "DIS-TR" / "gt_edge" / "a.png"
    assert not cached.exists()
    first = ds[0]["edge"]
    assert cached.exists() and not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temp files
    assert np.array_equal(np.asarray(Image.open(cached)) > 0, first[0].numpy() > 0)
    stamp = cached.stat().st_mtime_ns

    calls = []
    real = dis.edge_from_mask
    monkeypatch.setattr(dis, "edge_from_mask", lambda m: calls.append(1) or real(m))
    again = DISFolder(tree / "DIS-TR")[0]["edge"]
    assert torch.equal(first, again) and calls == [] and cached.stat().st_mtime_ns == stamp

    mask_file = tree / "DIS-TR" / "gt" / "a.png"
    later = stamp + 10**9
    os.utime(mask_file, ns=(later, later))  # the mask changed after its edge was cached: recomputed
    DISFolder(tree / "DIS-TR")[0]
    assert calls == [1] and cached.stat().st_mtime_ns != stamp

    DISFolder(tree / "DIS-TR", cache_edges=False)[1]
    assert not (tree / "DIS-TR" / "gt_edge" / "b.png").exists()


def test_edge_is_dilation_minus_erosion() -> None:
    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((23, 31)) < 0.55)
    mask[:, 0] = True  # touches the border
    mask[5, 10:25] = True  # a 1-px wire
    square = footprint_rectangle((5, 5))
    reference = dilation(mask, square) & ~erosion(mask, square)
    assert np.array_equal(edge_from_mask(mask), reference)
    scipy_ref = ndimage.binary_dilation(mask, square) & ~ndimage.binary_erosion(mask, square, border_value=1)
    assert np.array_equal(edge_from_mask(mask), scipy_ref)
    assert edge_from_mask(np.zeros((8, 8), bool)).sum() == 0 and edge_from_mask(np.ones((8, 8), bool)).sum() == 0


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_mask_size_mismatch_names_both_files(tree: Path) -> None:
    _save(tree / "DIS-TR" / "gt" / "a.png", _mask(31, 40))
    with pytest.raises(DISFileError, match=r"gt/a\.png.*40x31.*im/a\.jpg.*40x30"):
        DISFolder(tree / "DIS-TR")[0]


def test_non_binary_masks(tmp_path: Path) -> None:
    binary = _mask(40, 40) >= 128
    soft = (np.linspace(0, 255, 40)[None].repeat(40, 0)).astype(np.uint8)  # a probability ramp
    _save(tmp_path / "soft.png", soft)
    with pytest.raises(DISFileError, match=r"soft\.png is not binary.*accepted: 8-bit grey"):
        read_mask(tmp_path / "soft.png")

    blurred = np.clip(ndimage.gaussian_filter(binary.astype(float) * 255, 0.7), 0, 255).astype(np.uint8)
    assert ((blurred > 40) & (blurred < 215)).any()  # anti-aliased boundary: accepted, thresholded at 128
    _save(tmp_path / "aa.png", blurred)
    assert np.array_equal(read_mask(tmp_path / "aa.png"), blurred >= 128)

    _save(tmp_path / "labels.png", binary.astype(np.uint8))
    with pytest.raises(DISFileError, match=r"labels\.png holds only the values 0 and 1"):
        read_mask(tmp_path / "labels.png")


def test_16_bit_and_colour_masks(tmp_path: Path) -> None:
    binary = _mask(20, 20) >= 128
    _save(tmp_path / "deep.png", binary.astype(np.uint16) * 65535)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    with pytest.raises(DISFileError, match=r"deep\.png is a I;16.*Convert it to 8-bit"):
        read_mask(tmp_path / "deep.png")

    grey_rgb = np.repeat(binary[..., None].astype(np.uint8) * 255, 3, 2)
    _save(tmp_path / "grey_rgb.png", grey_rgb)
    assert np.array_equal(read_mask(tmp_path / "grey_rgb.png"), binary)
    colour = grey_rgb.copy()
    colour[binary, 1] = 0
    _save(tmp_path / "colour.png", colour)
    with pytest.raises(DISFileError, match=r"colour\.png is a colour \(RGB\) image whose channels differ"):
        read_mask(tmp_path / "colour.png")


def test_unreadable_and_truncated_files(tree: Path) -> None:
    image = tree / "DIS-TR" / "im" / "a.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    ds = DISFolder(tree / "DIS-TR")
    with pytest.raises(DISFileError, match=r"image .*im/a\.jpg cannot be read"):
        ds[0]
    (tree / "DIS-TR" / "gt" / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(DISFileError, match=r"mask .*gt/b\.png cannot be read"):
        ds[1]


def test_empty_folder_and_unpaired_stems(tmp_path: Path) -> None:
    (tmp_path / "empty" / "im").mkdir(parents=True)
    (tmp_path / "empty" / "gt").mkdir()
    with pytest.raises(DISFileError, match=r"empty/im holds no images"):
        DISFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="im"):
        DISFolder(tmp_path / "nowhere")

    split = tmp_path / "split"
    for stem in ("s1", "s2", "s3", "s4"):
        _pair(split, stem, 8, 8)
    (split / "gt" / "s2.png").unlink()
    (split / "gt" / "s4.png").unlink()
    _save(split / "gt" / "orphan.png", _mask(8, 8))
    with pytest.raises(DISFileError, match=r"2 images without a mask .*s2, s4.*1 masks without an image .*orphan"):
        DISFolder(split)


def _one_pixel_wide(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with background on both sides horizontally or vertically (a 1-px-wide part)."""
    p = np.pad(mask, 1)
    core = p[1:-1, 1:-1]
    return core & ((~p[1:-1, :-2] & ~p[1:-1, 2:]) | (~p[:-2, 1:-1] & ~p[2:, 1:-1]))


def test_scenes_are_deterministic_thin_and_split() -> None:
    for index in range(5):  # one scene of each kind
        a, b = render_dis_scene(index, 256, 0, 1.0), render_dis_scene(index, 256, 0, 1.0)
        assert a["kind"] == dis._SCENE_KINDS[index]
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
        assert a["image"].shape == (3, 256, 256) and a["image"].dtype == np.float32
        assert a["image"].min() >= 0 and a["image"].max() <= 1
        m = a["mask"]
        assert m.dtype == bool and 0.005 < m.mean() < 0.6
        assert _one_pixel_wide(m).sum() >= 20, a["kind"]  # 1-px structures at the hardest end
    easy = sum(_one_pixel_wide(render_dis_scene(i, 256, 0, 0.0)["mask"]).sum() for i in range(5))
    hard = sum(_one_pixel_wide(render_dis_scene(i, 256, 0, 1.0)["mask"]).sum() for i in range(5))
    assert hard > 5 * max(easy, 1)

    train, val, test = (DISScenes.split(s, 3) for s in ("train", "val", "test"))
    assert (train.seed, val.seed, test.seed) == (0, 1, 2)
    items = [ds[0] for ds in (train, val, test)]
    for x, y in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(items[x]["mask"], items[y]["mask"])
    assert len({ds.fingerprint for ds in (train, val, test)}) == 3
    assert not np.array_equal(render_dis_scene(0, 256, 0, 0.5)["mask"], render_dis_scene(0, 256, 0, 0.6)["mask"])
    with pytest.raises(KeyError, match="train"):
        DISScenes.split("holdout")
    with pytest.raises(ValueError, match="difficulty"):
        DISScenes(4, difficulty=1.5)


def test_scene_items_match_the_folder_format() -> None:
    ds = DISScenes(4, size=256, seed=0, difficulty=0.8)
    item = ds[3]
    assert set(item) == {"image", "mask", "edge", "name", "index"}
    assert item["image"].shape == (3, 256, 256) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == item["edge"].shape == (1, 256, 256)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(item["edge"][0].bool(), torch.from_numpy(edge_from_mask(item["mask"][0].bool().numpy())))
    assert torch.equal(ds[3]["image"], item["image"])
    with pytest.raises(IndexError):
        ds[4]


def test_scene_render_is_fast() -> None:
    render_dis_scene(0, 256, 0, 1.0)  # warm the glyph and horse caches
    times = []
    for i in range(10):
        start = time.perf_counter()
        render_dis_scene(i, 256, 7, 1.0)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.15  # ~20-40 ms on one core; generous for a loaded machine


def test_datamodule_generated_and_folder(tree: Path) -> None:
    dm = DISDataModule(size=256, batch_size=2, lengths=(4, 2, 2), difficulty=1.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 256, 256) and batch["mask"].shape == batch["edge"].shape == (2, 1, 256, 256)
    assert len(batch["name"]) == 2
    val = next(iter(dm.val_dataloader()))
    assert val["index"].tolist() == [0, 1] and val["name"][0].startswith("dis-scene-1-")

    _pair(tree / "DIS-TE2", "e", 20, 30)
    folder = DISDataModule(tree, size=16, batch_size=2, test_splits=("DIS-TE1", "DIS-TE2"))
    batch = next(iter(folder.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and sorted(batch["name"]) == ["a", "b"]
    assert next(iter(folder.val_dataloader()))["name"] == ["c"]
    tests = folder.test_dataloader()
    assert [next(iter(t))["name"] for t in tests] == [["d"], ["e"]]
    full = DISDataModule(tree, size=16, batch_size=2, eval_full_resolution=True, test_splits=("DIS-TE1",))
    assert next(iter(full.test_dataloader()))["image"].shape == (1, 3, 24, 40)
