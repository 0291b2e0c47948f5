"""COCO detection folders: writing, validating and reading them, and the labelled scenes exported as one.

A difffeat COCO folder is what every detection framework reads unchanged::

    root/
      annotations.json     info, images (id, file_name, width, height), annotations (id, image_id,
                           category_id, bbox [x, y, w, h], area, iscrowd 0), categories (id, name)
      images/000000.png …

The json is only ever written by :func:`write_coco`: checked field by field first (clear errors naming the
image or annotation), written to a temporary file, loaded back with ``pycocotools`` (the reference reader)
and only then renamed into place, so a reader sees the old file or a whole, valid new one.

Box conventions: the scenes give ``x0, y0, x1, y1`` with exclusive ends (pixel columns ``x0 … x1 - 1``), so
the COCO box is ``[x0, y0, x1 - x0, y1 - y0]`` and a box exactly covers the object's pixels. ``area`` is the
box area ``w · h`` for real and synthesized images alike (synthesized images have no masks), so COCO's
small / medium / large ranges mean the same thing on both.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from difffeat.store import atomic_write, replace_folder

__all__ = [
    "ANNOTATIONS",
    "IMAGES",
    "CocoDetection",
    "CocoError",
    "DetectionDataModule",
    "SceneDetection",
    "clean_boxes",
    "collate_detection",
    "export_scenes",
    "load_coco",
    "save_image",
    "validate_coco",
    "write_coco",
]

log = logging.getLogger(__name__)

#: the json's name inside a COCO folder
ANNOTATIONS = "annotations.json"
#: the images' sub-folder
IMAGES = "images"


class CocoError(ValueError):
    """A COCO dataset that breaks the format (the message names the file, image or annotation)."""


def _load_pycoco(path: Path) -> Any:
    """``pycocotools.coco.COCO`` of a json file, quietly (it prints while indexing)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def validate_coco(data: dict[str, Any], where: str = "COCO json", image_dir: str | Path | None = None) -> None:
    """Checks a COCO detection dict field by field.

    Args:
        data: the parsed json.
        where: how the data is named in messages (its path).
        image_dir: when given, every ``file_name`` must exist in it.

    Raises:
        CocoError: a missing key, duplicate id, unknown image or category id, a box that is not
            ``[x, y, w, h]`` with ``w, h > 0`` inside its image, a wrong area or ``iscrowd``, or a missing file.
    """
    for key in ("info", "images", "annotations", "categories"):
        if key not in data:
            raise CocoError(f"{where}: no {key!r} key (a COCO detection json has info, images, annotations, "
                            f"categories); found {sorted(data)}")
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if "id" not in c or "name" not in c:
            raise CocoError(f"{where}: category {c} needs 'id' and 'name'")
        if c["id"] in cats:
            raise CocoError(f"{where}: category id {c['id']} appears twice")
        cats[int(c["id"])] = str(c["name"])
    if len(set(cats.values())) != len(cats):
        raise CocoError(f"{where}: category names repeat: {sorted(cats.values())}")
    sizes: dict[int, tuple[int, int]] = {}
    for im in data["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if k not in im]
        if missing:
            raise CocoError(f"{where}: image {im.get('id', im)} lacks {missing}")
        if im["id"] in sizes:
            raise CocoError(f"{where}: image id {im['id']} appears twice")
        if im["width"] < 1 or im["height"] < 1:
            raise CocoError(f"{where}: image {im['id']} ({im['file_name']}) has size {im['width']}x{im['height']}")
        if image_dir is not None and not (Path(image_dir) / im["file_name"]).is_file():
            raise CocoError(f"{where}: image {im['id']}'s file {Path(image_dir) / im['file_name']} does not exist")
        sizes[int(im["id"])] = (int(im["width"]), int(im["height"]))
    seen: set[int] = set()
    for a in data["annotations"]:
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd") if k not in a]
        if missing:
            raise CocoError(f"{where}: annotation {a.get('id', a)} lacks {missing}")
        if a["id"] in seen:
            raise CocoError(f"{where}: annotation id {a['id']} appears twice")
        seen.add(a["id"])
        if a["image_id"] not in sizes:
            raise CocoError(f"{where}: annotation {a['id']} refers to image {a['image_id']}, which is not listed")
        if a["category_id"] not in cats:
            raise CocoError(f"{where}: annotation {a['id']} has category {a['category_id']}; the categories are "
                            f"{cats}")
        box = a["bbox"]
        if len(box) != 4 or not all(np.isfinite(box)):
            raise CocoError(f"{where}: annotation {a['id']} bbox {box} is not [x, y, w, h]")
        x, y, w, h = box
        width, height = sizes[a["image_id"]]
        if w <= 0 or h <= 0:
            raise CocoError(f"{where}: annotation {a['id']} (image {a['image_id']}) has a zero-area box {box}")
        eps = 1e-3
        if x < -eps or y < -eps or x + w > width + eps or y + h > height + eps:
            raise CocoError(f"{where}: annotation {a['id']} box {box} leaves its {width}x{height} image "
                            f"{a['image_id']}; clip it (clean_boxes) first")
        if a["area"] <= 0:
            raise CocoError(f"{where}: annotation {a['id']} has area {a['area']}")
        if a["iscrowd"] not in (0, 1):
            raise CocoError(f"{where}: annotation {a['id']} has iscrowd {a['iscrowd']}; expected 0 or 1")


def write_coco(path: str | Path, data: dict[str, Any], image_dir: str | Path | None = None) -> None:
    """Validates ``data``, writes it atomically and loads the written file with pycocotools.

    The file is renamed into place only after ``pycocotools.coco.COCO`` has indexed it, so a json that the
    reference reader rejects never replaces a good one.

    Args:
        path: the json's path.
        data: the COCO dict.
        image_dir: the folder ``file_name`` is relative to (checked when given).

    Raises:
        CocoError: see :func:`validate_coco`, or pycocotools failed to read the written json.
    """
    path = Path(path)
    validate_coco(data, str(path), image_dir)
    tmp = path.with_name(f".{path.name}.check-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        atomic_write(tmp, json.dumps(data).encode())
        try:
            coco = _load_pycoco(tmp)
        except Exception as err:
            raise CocoError(f"pycocotools cannot read the json for {path}: {err}") from err
        if len(coco.getImgIds()) != len(data["images"]) or len(coco.getAnnIds()) != len(data["annotations"]):
            raise CocoError(f"pycocotools indexed {len(coco.getImgIds())} images / {len(coco.getAnnIds())} "
                            f"annotations of {path}, expected {len(data['images'])} / {len(data['annotations'])}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_coco(root: str | Path) -> dict[str, Any]:
    """The validated json of a COCO folder ``root`` (``root/annotations.json``, images under ``root/images``).

    Raises:
        FileNotFoundError: no annotations file.
        CocoError: an invalid json (see :func:`validate_coco`) or no image at all.
    """
    root = Path(root)
    path = root / ANNOTATIONS
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a COCO folder: no {ANNOTATIONS}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CocoError(f"{path} is not valid JSON: {err}") from err
    validate_coco(data, str(path), root / IMAGES)
    if not data["images"]:
        raise CocoError(f"{path} lists no images")
    return data


def clean_boxes(boxes: torch.Tensor, width: int, height: int, where: str = "", min_size: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``x0, y0, x1, y1`` boxes to the image and drops those left smaller than ``min_size``; logs both.

    Args:
        boxes: ``(N, 4)`` boxes in pixels.
        width: image width.
        height: image height.
        where: how the image is named in the log lines.
        min_size: boxes narrower or lower than this after clipping are dropped (zero-area boxes included).

    Returns:
        ``(clipped boxes, keep)``: the kept boxes and the boolean mask of kept rows of ``boxes``.

    Raises:
        ValueError: ``boxes`` not ``(N, 4)`` or holding NaN/Inf.
    """
    from torchvision.ops import clip_boxes_to_image

    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) x0, y0, x1, y1, got shape {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"boxes of {where or 'an image'} hold NaN or Inf")
    clipped = clip_boxes_to_image(boxes, (height, width))
    moved = (clipped != boxes).any(1)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    if moved.any():
        log.info("%s: clipped %d box(es) to the %dx%d image", where or "image", int(moved.sum()), width, height)
    if (~keep).any():
        log.info("%s: dropped %d box(es) smaller than %g px after clipping", where or "image", int((~keep).sum()),
                 min_size)
    return clipped[keep], keep


def save_image(path: str | Path, image: torch.Tensor | np.ndarray) -> None:
    """Writes a ``(3, H, W)`` image in ``[-1, 1]`` as an 8-bit PNG, atomically."""
    a = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    png = np.clip(np.round((a.transpose(1, 2, 0) + 1) * 127.5), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(png)).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def coco_box(box: Sequence[float]) -> list[float]:
    """``[x, y, w, h]`` of an ``x0, y0, x1, y1`` box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def export_scenes(out_dir: str | Path, length: int, size: int = 64, seed: int = 0,
                  classes: Sequence[int] | None = None, max_objects: int = 4, min_objects: int = 1,
                  offset: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Writes labelled generated scenes (:func:`~difffeat.data.scenes.render_scene`) as a COCO folder.

    Category ``k + 1`` is the ``k``-th class of ``classes`` (sorted), named as in
    :data:`~difffeat.data.scenes.CLASSES`. The folder is built beside ``out_dir`` and renamed into place
    when complete, so a crash leaves no partial dataset.

    Args:
        out_dir: the COCO folder to create.
        length: number of scenes.
        size: scene side in pixels.
        seed: scene seed (use different seeds, or ``offset``, for train and test sets).
        classes: scene class ids (default all 20).
        max_objects: at most this many objects per scene.
        min_objects: at least this many visible objects.
        offset: scene indices ``offset … offset + length - 1``.
        overwrite: replace an existing ``out_dir`` (else it is refused).
        progress: show a progress bar.

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is off.
        ValueError: ``length < 1`` or scene arguments out of range.
    """
    from difffeat.data.scenes import CLASSES, render_scene

    out_dir = Path(out_dir)
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    pool = sorted(set(range(len(CLASSES)) if classes is None else classes))
    variant = {"min_objects": min_objects} if min_objects > 1 else {}
    render_scene(offset, size, seed, pool, max_objects, **variant)  # validates the arguments first
    cat_of = {c: k + 1 for k, c in enumerate(pool)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    (tmp / IMAGES).mkdir(parents=True)
    try:
        images, annotations = [], []
        for i in tqdm(range(offset, offset + length), disable=not progress, desc="scenes to COCO"):
            s = render_scene(i, size, seed, pool, max_objects, **variant)
            name = f"{i:06d}.png"
            save_image(tmp / IMAGES / name, torch.from_numpy(s["image"]) * 2 - 1)
            images.append({"id": i, "file_name": name, "width": size, "height": size})
            for box, label in zip(s["boxes"], s["labels"], strict=True):
                b = coco_box(box)
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat_of[int(label)],
                                    "bbox": b, "area": b[2] * b[3], "iscrowd": 0})
        data = {"info": {"description": "difffeat generated scenes", "seed": seed, "size": size,
                         "offset": offset, "length": length, "max_objects": max_objects,
                         "min_objects": min_objects},
                "images": images, "annotations": annotations,
                "categories": [{"id": cat_of[c], "name": CLASSES[c]} for c in pool]}
        write_coco(tmp / ANNOTATIONS, data, tmp / IMAGES)
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _read_png(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), np.float32)
    except (OSError, Image.DecompressionBombError) as err:
        raise CocoError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1


class CocoDetection(Dataset):
    """A COCO folder as detection samples (torchvision's ``CocoDetection`` with tensor targets).

    Items: ``image`` ``(3, H, W)`` float in ``[-1, 1]``; ``boxes`` ``(N, 4)`` float ``x0, y0, x1, y1``;
    ``labels`` ``(N,)`` int64, the *contiguous* category index ``0 … K-1`` (position in :attr:`categories`,
    sorted by id; add 1 for torchvision's background-at-0 convention); ``image_id``; ``index``.
    Crowd annotations are skipped.

    Args:
        root: the COCO folder.
        limit: use only the first ``limit`` images (in json order).

    Raises:
        FileNotFoundError: not a COCO folder.
        CocoError: an invalid json or a folder without images.
    """

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        self.root = Path(root)
        data = load_coco(self.root)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        #: category names, in contiguous-label order
        self.categories = [c["name"] for c in cats]
        self.category_ids = [int(c["id"]) for c in cats]
        index = {cid: k for k, cid in enumerate(self.category_ids)}
        self.images = data["images"][:limit] if limit is not None else data["images"]
        by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            if a["image_id"] in by_image and not a["iscrowd"]:
                by_image[a["image_id"]].append(a)
        self._targets = []
        for im in self.images:
            anns = by_image[im["id"]]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                 dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([index[a["category_id"]] for a in anns], dtype=torch.int64)
            self._targets.append((boxes, labels))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        im = self.images[i]
        image = _read_png(self.root / IMAGES / im["file_name"])
        if tuple(image.shape[-2:]) != (im["height"], im["width"]):
            raise CocoError(f"{self.root / IMAGES / im['file_name']} is {image.shape[-1]}x{image.shape[-2]}, the "
                            f"json says {im['width']}x{im['height']}")
        boxes, labels = self._targets[i]
        return {"image": image, "boxes": boxes.clone(), "labels": labels.clone(), "image_id": int(im["id"]),
                "index": i}


class SceneDetection(Dataset):
    """Generated scenes as detection samples, rendered on access (the item format of :class:`CocoDetection`).

    Labels are positions in the sorted ``classes``; :attr:`categories` names them.

    Args:
        length: number of scenes.
        size: scene side.
        seed: scene seed.
        classes: scene class ids (default all 20).
        max_objects: at most this many objects per scene.
        offset: first scene index.
    """

    def __init__(self, length: int, size: int = 64, seed: int = 0, classes: Sequence[int] | None = None,
                 max_objects: int = 4, offset: int = 0) -> None:
        from difffeat.data.scenes import CLASSES, render_scene

        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.pool = sorted(set(range(len(CLASSES)) if classes is None else classes))
        render_scene(offset, size, seed, self.pool, max_objects)  # validates the arguments now
        self.length, self.size, self.seed, self.max_objects, self.offset = length, size, seed, max_objects, offset
        self.categories = [CLASSES[c] for c in self.pool]
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        from difffeat.data.scenes import render_scene

        if not 0 <= i < self.length:
            raise IndexError(f"scene {i} out of range for {self.length} scenes")
        if i not in self._cache:
            s = render_scene(self.offset + i, self.size, self.seed, self.pool, self.max_objects)
            position = {c: k for k, c in enumerate(self.pool)}
            # through 8 bits, as the exported PNGs: a detector sees the same pixels from either source
            image = torch.from_numpy(np.round(s["image"] * 255) / 127.5 - 1).float()
            self._cache[i] = {"image": image, "boxes": torch.from_numpy(s["boxes"]).float(),
                              "labels": torch.tensor([position[int(c)] for c in s["labels"]], dtype=torch.int64),
                              "image_id": self.offset + i, "index": i}
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._cache[i].items()}


def collate_detection(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks images (equal sizes) and keeps boxes / labels as per-image lists."""
    return {"image": torch.stack([it["image"] for it in items]), "boxes": [it["boxes"] for it in items],
            "labels": [it["labels"] for it in items], "image_id": [it["image_id"] for it in items],
            "index": torch.tensor([it["index"] for it in items])}


class DetectionDataModule(L.LightningDataModule):
    """Detection batches from COCO folders, or from generated scenes when no folder is given.

    Args:
        train_root: a COCO folder to train on (``None``: ``train_scenes`` generated scenes).
        val_root: a COCO folder to validate on (``None``: ``val_scenes`` scenes of seed ``seed + 1000``).
        train_scenes: number of generated training scenes (the "few labelled images").
        val_scenes: number of generated validation scenes.
        size: scene side.
        seed: scene seed of the training scenes.
        classes: scene class ids.
        max_objects: objects per scene at most.
        batch_size: batch size.
        num_workers: loader workers.
    """

    def __init__(self, train_root: str | None = None, val_root: str | None = None, train_scenes: int = 50,
                 val_scenes: int = 50, size: int = 64, seed: int = 0, classes: list[int] | None = None,
                 max_objects: int = 4, batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        self.train_root, self.val_root = train_root, val_root
        self.scene_args = {"size": size, "classes": classes, "max_objects": max_objects}
        self.train_scenes, self.val_scenes, self.seed = train_scenes, val_scenes, seed
        self.batch_size, self.num_workers = batch_size, num_workers

    def _dataset(self, root: str | None, length: int, seed: int) -> Dataset:
        return CocoDetection(root) if root is not None else SceneDetection(length, seed=seed, **self.scene_args)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (:func:`collate_detection`)."""
        return DataLoader(self._dataset(self.train_root, self.train_scenes, self.seed), self.batch_size,
                          shuffle=True, num_workers=self.num_workers, collate_fn=collate_detection)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return DataLoader(self._dataset(self.val_root, self.val_scenes, self.seed + 1000), self.batch_size,
                          num_workers=self.num_workers, collate_fn=collate_detection)
