"""Generated scenes with real glyphs: the dense-prediction benchmark that ships with the project.

Each scene composites *real* handwritten digits (scikit-learn's scans, upsampled) and procedural shapes
over a textured, noisy background, and comes with per-object class ids, instance masks (visible parts,
after occlusion), boxes, a semantic map and thin edge maps. Everything is a pure function of
``(seed, index, size)``: the same arguments give the same scene, bit for bit, on any machine.

Classes (20): the digits 0–9 and ten shapes, interleaved so that each of the four folds of five classes
(PASCAL-5i style: fold ``i`` holds classes ``5i … 5i+4``) mixes glyphs and shapes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache

import lightning as L
import numpy as np
import torch
from scipy.ndimage import gaussian_filter, zoom
from skimage.draw import disk, ellipse, polygon
from skimage.segmentation import find_boundaries
from torch.utils.data import DataLoader, Dataset

__all__ = ["CLASSES", "FOLDS", "SHAPES", "SceneDataModule", "SceneDataset", "fold_classes", "render_scene"]

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "ellipse", "crescent")
CLASSES = tuple(name for pair in zip((f"digit{d}" for d in range(10)), SHAPES, strict=True) for name in pair)
FOLDS = 4


def fold_classes(fold: int) -> list[int]:
    """Class ids of fold ``fold`` (its novel classes): ``5·fold … 5·fold + 4``."""
    if not 0 <= fold < FOLDS:
        raise ValueError(f"fold must be in 0 … {FOLDS - 1}, got {fold}")
    return list(range(5 * fold, 5 * fold + 5))


@cache
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target


def _polygon_mask(n: int, pts: np.ndarray) -> np.ndarray:
    mask = np.zeros((n, n), bool)
    rr, cc = polygon(pts[:, 1], pts[:, 0], (n, n))
    mask[rr, cc] = True
    return mask


def _regular(k: int, radius: float, angle: float, c: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular ``k``-gon (or a ``k``-pointed star with ``inner`` radius) around ``(c, c)``."""
    if inner is None:
        t = angle + 2 * np.pi * np.arange(k) / k
        return np.stack([c + radius * np.cos(t), c + radius * np.sin(t)], 1)
    t = angle + np.pi * np.arange(2 * k) / k
    r = np.where(np.arange(2 * k) % 2 == 0, radius, inner)
    return np.stack([c + r * np.cos(t), c + r * np.sin(t)], 1)


def _shape_mask(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A filled shape in an ``n × n`` box, randomly rotated."""
    c, r, a = (n - 1) / 2, 0.48 * n, rng.uniform(0, 2 * np.pi)
    mask = np.zeros((n, n), bool)
    if kind == "circle":
        mask[disk((c, c), r, shape=(n, n))] = True
    elif kind == "ring":
        mask[disk((c, c), r, shape=(n, n))] = True
        mask[disk((c, c), r * rng.uniform(0.45, 0.65), shape=(n, n))] = False
    elif kind == "crescent":
        mask[disk((c, c), r, shape=(n, n))] = True
        off = 0.45 * r
        mask[disk((c + off * np.sin(a), c + off * np.cos(a)), r * 0.85, shape=(n, n))] = False
    elif kind == "ellipse":
        rr, cc = ellipse(c, c, r, r * rng.uniform(0.4, 0.6), shape=(n, n), rotation=a)
        mask[rr, cc] = True
    elif kind == "cross":
        w = r * rng.uniform(0.3, 0.45)
        arm = np.array([[-w, -r], [w, -r], [w, -w], [r, -w], [r, w], [w, w], [w, r], [-w, r], [-w, w], [-r, w],
                        [-r, -w], [-w, -w]])
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        mask = _polygon_mask(n, arm @ rot.T + c)
    else:
        sides = {"square": (4, None), "triangle": (3, None), "diamond": (4, None), "hexagon": (6, None),
                 "star": (5, 0.45 * r)}[kind]
        pts = _regular(sides[0], r, a, c, sides[1])
        if kind == "diamond":  # a rhombus: squash one diagonal
            pts = (pts - c) @ np.diag([1.0, 0.55]) @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) + c
        mask = _polygon_mask(n, pts)
    return mask


def _glyph_mask(digit: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A real handwritten ``digit`` (a random scikit-learn scan of it) upsampled to ``n × n`` and thresholded."""
    images, targets = _glyphs()
    choice = rng.choice(np.flatnonzero(targets == digit))
    big = zoom(images[choice], n / 8, order=1)[:n, :n]
    return big > 0.35


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field plus stripes and pixel noise, in ``[0, 1]``, ``(3, size, size)``."""
    field = gaussian_filter(rng.standard_normal((3, size, size)), sigma=(0, size / 8, size / 8))
    field = (field - field.mean()) / (field.std() + 1e-8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    f, theta = rng.uniform(2, 8), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * f * (xx * np.cos(theta) + yy * np.sin(theta)))
    base = rng.uniform(0.25, 0.75, (3, 1, 1))
    img = base + 0.12 * field + 0.06 * stripes + 0.04 * rng.standard_normal((3, size, size))
    return np.clip(img, 0, 1)


def _object_texture(colour: np.ndarray, background: np.ndarray, size: int, rng: np.random.Generator
                    ) -> np.ndarray:
    """A per-instance texture ``(3, size, size)``: stripes of ``colour`` and a second random colour, shaded.

    Frequency, angle, stripe contrast and the second colour are drawn per object, so neither colour nor
    texture carries the class: only the shape does.
    """
    other = rng.uniform(0, 1, (3, 1, 1))
    other = np.where(np.abs(other - background[:, None]) < 0.3, 1 - other, other)
    yy, xx = np.mgrid[0:size, 0:size] / size
    f, theta, amount = rng.uniform(3, 12), rng.uniform(0, np.pi), rng.uniform(0, 0.8)
    mix = amount * (0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(theta) + yy * np.sin(theta))))
    shade = 1 + 0.15 * gaussian_filter(rng.standard_normal((size, size)), 2)
    return (colour[:, :, None] * (1 - mix) + other * mix) * shade


def render_scene(index: int, size: int = 128, seed: int = 0, classes: Sequence[int] | None = None,
                 max_objects: int = 4, min_objects: int = 1, distinct: bool = False,
                 textured: bool = False) -> dict[str, np.ndarray]:
    """One scene as numpy arrays.

    With the defaults a scene is drawn exactly as in version 1 of the generator (same random stream,
    same bytes). Any of ``min_objects > 1``, ``distinct`` or ``textured`` selects the multi-object
    variant the few-shot training episodes use: its random stream is seeded with these options too, and
    a scene whose *visible* objects (after occlusion) number fewer than ``min_objects`` is redrawn from
    the next seed (attempt 1, 2, …), so the guarantee holds for what the masks show.

    Args:
        index: scene number (with ``seed``, it fixes the scene).
        size: side in pixels (32–512). Below 64 the scene is the one of twice the size, reduced 2×2
            (:func:`_halve`; redrawn as above if the reduction leaves fewer than ``min_objects``), so
            small objects keep their shapes: at 32 px a star drawn directly would be a blob of a few pixels.
        seed: benchmark seed.
        classes: class ids objects are drawn from (default: all 20).
        max_objects: objects per scene are drawn from ``min_objects … max_objects``.
        min_objects: at least this many visible objects (variant only; with the default 1 the scene is
            drawn once, as in version 1).
        distinct: objects of one scene have distinct classes (drawn without replacement; at most
            ``len(classes)`` objects).
        textured: each object gets its own random two-colour striped texture (instead of one flat colour
            with smooth shading), so appearance never identifies a class.

    Returns:
        ``image`` ``(3, H, W)`` float32 in ``[0, 1]``; ``semantic`` ``(H, W)`` int64 (0 = background, else
        class id + 1); ``masks`` ``(N, H, W)`` bool visible instance masks; ``labels`` ``(N,)``; ``boxes``
        ``(N, 4)`` ``x0, y0, x1, y1`` (exclusive ends); ``edges`` ``(H, W)`` bool object boundaries.

    Raises:
        ValueError: a size, class list or object counts out of range.
        RuntimeError: the variant found no scene with ``min_objects`` visible objects in 100 draws.
    """
    if not 32 <= size <= 512:
        raise ValueError(f"scene size must be in [32, 512], got {size}")
    pool = list(range(len(CLASSES))) if classes is None else list(classes)
    if not pool or any(not 0 <= c < len(CLASSES) for c in pool):
        raise ValueError(f"classes must be a non-empty subset of 0 … {len(CLASSES) - 1}, got {classes}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if distinct and min_objects > len(set(pool)):
        raise ValueError(f"{min_objects} objects of distinct classes need as many classes, got {len(set(pool))}")
    variant = min_objects > 1 or distinct or textured
    draw_size, finish = (size, lambda scene: scene) if size >= 64 else (2 * size, _halve)
    key = f"{seed}:{index}:{draw_size}:{sorted(pool)}"  # a small scene is the double-size one, reduced
    if not variant:
        return finish(_draw(np.random.default_rng(_seed(key)), draw_size, pool, 1, max_objects, False, False))
    for attempt in range(100):
        rng = np.random.default_rng(_seed(f"{key}:v2:{min_objects}:{max_objects}:{distinct}:{textured}:{attempt}"))
        scene = finish(_draw(rng, draw_size, pool, min_objects, max_objects, distinct, textured))
        if len(scene["labels"]) >= min_objects:
            return scene
    raise RuntimeError(f"scene {index}: no draw of 100 held {min_objects} visible objects at {size} px")


def _halve(scene: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A scene reduced 2×2.

    The image is averaged; a pixel belongs to the instance covering most of its 2×2 cell, if that covers at
    least half; objects left with fewer than 2 pixels are dropped; semantic map, boxes and edges are rebuilt
    from the reduced masks.
    """
    c, h, w = scene["image"].shape
    image = scene["image"].reshape(c, h // 2, 2, w // 2, 2).mean((2, 4))
    n = len(scene["labels"])
    cover = scene["masks"].reshape(n, h // 2, 2, w // 2, 2).mean((2, 4))
    best = cover.argmax(0) if n else np.zeros((h // 2, w // 2), np.int64)  # one owner per pixel
    masks = (np.arange(n)[:, None, None] == best) & (cover >= 0.5)
    keep = masks.reshape(n, -1).sum(1) >= 2
    masks, labels = masks[keep], scene["labels"][keep]
    semantic = np.zeros((h // 2, w // 2), np.int64)
    owner = np.zeros((h // 2, w // 2), np.int64)
    boxes = np.zeros((len(labels), 4), np.int64)
    for i, (m, cls) in enumerate(zip(masks, labels, strict=True)):
        semantic[m], owner[m] = cls + 1, i + 1
        ys, xs = np.nonzero(m)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return {"image": image.astype(np.float32), "semantic": semantic, "masks": masks, "labels": labels,
            "boxes": boxes, "edges": find_boundaries(owner, mode="inner")}


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _draw(rng: np.random.Generator, size: int, pool: list[int], min_objects: int, max_objects: int,
          distinct: bool, textured: bool) -> dict[str, np.ndarray]:
    """The scene of :func:`render_scene` from its random stream (version 1 when the options are off)."""
    image = _texture(size, rng)
    owner = np.full((size, size), -1, np.int64)
    labels = []
    available = sorted(set(pool))
    count = int(rng.integers(min_objects, max_objects + 1))
    for k in range(min(count, len(available)) if distinct else count):
        if distinct:
            cls = int(rng.choice(available))
            available.remove(cls)
        else:
            cls = int(rng.choice(pool))
        n = int(rng.uniform(0.22, 0.45) * size)
        name = CLASSES[cls]
        local = _glyph_mask(int(name[-1]), n, rng) if name.startswith("digit") else _shape_mask(name, n, rng)
        y, x = (int(v) for v in rng.integers(0, size - n + 1, 2))
        region = np.zeros((size, size), bool)
        region[y:y + n, x:x + n] = local
        if region.sum() < 8:
            continue
        colour = rng.uniform(0, 1, (3, 1))
        background = image[:, region].mean(1, keepdims=True)
        colour = np.where(np.abs(colour - background) < 0.3, 1 - colour, colour)
        if textured:
            image[:, region] = np.clip(_object_texture(colour, background, size, rng)[:, region], 0, 1)
        else:
            shade = 1 + 0.15 * gaussian_filter(rng.standard_normal((size, size)), 2)
            image[:, region] = np.clip(colour * shade[region], 0, 1)
        owner[region] = k
        labels.append((k, cls))
    masks, kept = [], []
    for k, cls in labels:
        m = owner == k
        if m.sum() >= 8:  # drop objects hidden behind later ones
            masks.append(m)
            kept.append(cls)
    masks_arr = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    semantic = np.zeros((size, size), np.int64)
    boxes = np.zeros((len(kept), 4), np.int64)
    for i, (m, cls) in enumerate(zip(masks_arr, kept, strict=True)):
        semantic[m] = cls + 1
        ys, xs = np.nonzero(m)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    edges = find_boundaries(np.where(semantic > 0, owner + 1, 0), mode="inner")
    image = np.clip(image + 0.02 * rng.standard_normal(image.shape), 0, 1).astype(np.float32)
    return {"image": image, "semantic": semantic, "masks": masks_arr, "labels": np.array(kept, np.int64),
            "boxes": boxes, "edges": edges}


class SceneDataset(Dataset):
    """``length`` generated scenes as tensors (rendered on access; deterministic).

    Items: ``image`` ``(3, H, W)`` in ``[-1, 1]``, ``semantic``, ``masks``, ``labels``, ``boxes``, ``edges``
    (see :func:`render_scene`) and ``index``.

    Args:
        length: number of scenes.
        size: scene side in pixels.
        seed: benchmark seed.
        classes: class ids objects are drawn from (default all).
        max_objects: at most this many objects per scene.
        min_objects: at least this many visible objects (see :func:`render_scene`).
        distinct: objects of a scene have distinct classes.
        textured: a random texture per object.
        cache: keep every scene rendered in memory (a textured scene takes tens of milliseconds to draw,
            as long as a small model's training step; episodes reread the same scenes many times). Items
            are served as copies, so a consumer that edits one in place never changes the cache. About
            ``length · 25 KB`` at 32 px, ×4 per doubling of the side.
    """

    def __init__(self, length: int = 1000, size: int = 128, seed: int = 0, classes: Sequence[int] | None = None,
                 max_objects: int = 4, min_objects: int = 1, distinct: bool = False, textured: bool = False,
                 cache: bool = False) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.options = {"min_objects": min_objects, "distinct": distinct, "textured": textured}
        render_scene(0, size, seed, classes, max_objects, **self.options)  # validates the arguments now
        self.length, self.size, self.seed, self.max_objects = length, size, seed, max_objects
        self.classes = None if classes is None else list(classes)
        self._cache: dict[int, dict[str, torch.Tensor | int]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= i < self.length:
            raise IndexError(f"scene {i} out of range for {self.length} scenes")
        if self._cache is not None and i in self._cache:
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._cache[i].items()}
        s = render_scene(i, self.size, self.seed, self.classes, self.max_objects, **self.options)
        out = {k: torch.from_numpy(v) for k, v in s.items()}
        out["image"] = out["image"] * 2 - 1
        out["index"] = i
        if self._cache is not None:
            self._cache[i] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out

    @property
    def fingerprint(self) -> str:
        """Scenes are a pure function of these arguments and the generator's version.

        Version-1 scenes (the options at their defaults) keep their version-1 fingerprint; the
        multi-object variant is ``scenes-v2`` with its options.
        """
        base = f"{self.length}:{self.size}:{self.seed}:{self.classes}:{self.max_objects}"
        if self.options == {"min_objects": 1, "distinct": False, "textured": False}:
            return f"scenes-v1:{base}"
        o = self.options
        return f"scenes-v2:{base}:{o['min_objects']}:{o['distinct']}:{o['textured']}"


class SceneDataModule(L.LightningDataModule):
    """Scenes without labels for training a backbone on the scene benchmark (batches hold ``image``).

    Training scenes use ``seed``; the few-shot test scenes use another seed
    (:class:`~difffeat.data.episodes.FewShotDataModule`: ``seed + 1000``), so a backbone trained here
    never sees a test image. Objects of every class appear, unlabelled, as web images do for a
    pretrained diffusion model; no mask or class id is served.

    Args:
        length: number of scenes.
        size: scene side.
        seed: benchmark seed.
        batch_size: batch size.
        num_workers: loader workers.
        min_objects: at least this many visible objects per scene (see :func:`render_scene`).
        max_objects: at most this many objects per scene.
        distinct: objects of a scene have distinct classes.
        textured: a random texture per object (the few-shot episodes' appearance, so a backbone
            pretrained here sees the same kind of scenes).
    """

    def __init__(self, length: int = 4000, size: int = 64, seed: int = 0, batch_size: int = 16,
                 num_workers: int = 0, min_objects: int = 1, max_objects: int = 4, distinct: bool = False,
                 textured: bool = False) -> None:
        super().__init__()
        self.length, self.size, self.seed = length, size, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.scene_options = {"max_objects": max_objects, "min_objects": min_objects, "distinct": distinct,
                              "textured": textured}

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of scene images and their indices; the last incomplete batch is dropped."""
        scenes = SceneDataset(self.length, self.size, self.seed, **self.scene_options)
        return DataLoader(_Images(scenes), self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=True)


class _Images(Dataset):
    """Only the image of each scene (and its index), so batches collate without ragged annotations."""

    def __init__(self, scenes: SceneDataset) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"image": self.scenes[i]["image"], "index": i}
