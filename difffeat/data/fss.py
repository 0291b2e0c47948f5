"""Readers for the PASCAL-5i and COCO-20i folder layouts of the HSNet protocol.

PASCAL-5i (``root`` holds)::

    VOC2012/JPEGImages/<name>.jpg
    VOC2012/SegmentationClassAug/<name>.png        # class index per pixel, 0 background, 255 ignore
    splits/pascal/{trn,val}/fold<i>.txt            # lines "<name>__<class, 1-based, 2 digits>"

COCO-20i::

    COCO2014/{train2014,val2014}/<name>.jpg
    COCO2014/annotations/{train2014,val2014}/<name>.png
    splits/coco/{trn,val}/fold<i>.pkl              # {class id 0-based: ["train2014/<name>.jpg", ...]}

Novel classes of fold ``i``: PASCAL ``5i … 5i+4``; COCO ``i, i+4, …, i+76`` (interleaved, as HSNet).
Items follow the scene benchmark's format (``image`` in ``[-1, 1]`` resized to ``size``, ``semantic`` =
class id + 1, ``labels`` = the classes the split lists for that image, ``ignore`` = boundary pixels), so
:class:`~difffeat.data.episodes.FewShotEpisodes` draws episodes from either, and carries ``ignore`` as the
query's ``query_ignore`` to the metric and the loss (HSNet leaves these pixels out of its evaluation).
The ``.pkl`` splits are read with an unpickler that refuses every class: plain dicts, lists, strings and
numbers only, never code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["FSSFolder", "coco20i", "fold_class_ids", "pascal5i"]


def fold_class_ids(benchmark: str, fold: int) -> list[int]:
    """Novel (test) class ids of a fold.

    Args:
        benchmark: ``"pascal"`` or ``"coco"``.
        fold: 0 … 3.

    Returns:
        The fold's novel class ids, 0-based.

    Raises:
        KeyError: an unknown benchmark (the valid names listed).
    """
    if benchmark == "pascal":
        return list(range(5 * fold, 5 * fold + 5))
    if benchmark == "coco":
        return [fold + 4 * v for v in range(20)]
    raise KeyError(f"unknown benchmark {benchmark!r}; expected 'pascal' or 'coco'")


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"split file refers to {module}.{name}; only plain data is accepted")


class FSSFolder(Dataset):
    """Images with class-index masks and the classes a split lists for each.

    Args:
        entries: ``(image path, mask path, class ids)`` per image.
        size: side every image and mask is resized to (bilinear / nearest).
        fingerprint: identity of the split (stores are keyed by it).

    Raises:
        ValueError: no entries.
        FileNotFoundError: listed images or masks are missing (the count and the first few named).
    """

    def __init__(self, entries: list[tuple[Path, Path, list[int]]], size: int = 400, fingerprint: str = "") -> None:
        if not entries:
            raise ValueError("the split lists no images")
        missing = [str(p) for e in entries for p in e[:2] if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed files are missing, e.g. {missing[:3]}")
        self.entries, self.size, self.fingerprint = entries, size, fingerprint

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One image.

        Args:
            i: dataset index.

        Returns:
            ``image`` ``(3, size, size)`` in ``[-1, 1]``, ``semantic`` ``(size, size)`` (class id + 1,
            0 on background and on ignored pixels), ``ignore`` ``(size, size)`` bool (the mask's 255),
            ``labels`` (the split's classes of the image) and ``index``.

        Raises:
            ValueError: the mask is not a class-index image of the image's size.
        """
        image_path, mask_path, classes = self.entries[i]
        image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), np.float32) / 127.5 - 1)
        mask = torch.from_numpy(np.asarray(Image.open(mask_path), np.int64))
        if mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path} has shape {tuple(mask.shape)}; expected a class-index mask of the "
                             f"image's size {tuple(image.shape[:2])}")
        image = F.interpolate(image.permute(2, 0, 1)[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0].long()
        ignore = mask == 255
        return {"image": image, "semantic": torch.where(ignore, 0, mask), "ignore": ignore,
                "labels": torch.tensor(sorted(classes)), "index": i}


def _group(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, c in pairs:
        out.setdefault(name, []).append(c)
    return out


def pascal5i(root: str | Path, fold: int, split: str = "val", size: int = 400) -> FSSFolder:
    """PASCAL-5i images of one fold and split.

    Args:
        root: the HSNet-layout folder (see the module docstring).
        fold: 0 … 3.
        split: ``"trn"`` or ``"val"``.
        size: side images and masks are resized to.

    Returns:
        The dataset; each image lists every class the split pairs it with.

    Raises:
        FileNotFoundError: the split file or listed images are missing.
        ValueError: a split line not of the form ``<name>__<class>`` (file and line named).
    """
    root = Path(root)
    listing = root / "splits" / "pascal" / split / f"fold{fold}.txt"
    if not listing.exists():
        raise FileNotFoundError(f"{listing} not found: not an HSNet-layout PASCAL-5i folder")
    pairs = []
    for n, line in enumerate(listing.read_text().split(), 1):
        name, sep, cls = line.partition("__")
        if not sep or not cls.isdigit():
            raise ValueError(f"{listing}:{n}: {line!r} is not of the form '<name>__<class>'")
        pairs.append((name, int(cls) - 1))
    entries = [(root / "VOC2012/JPEGImages" / f"{name}.jpg", root / "VOC2012/SegmentationClassAug" / f"{name}.png",
                classes) for name, classes in _group(pairs).items()]
    return FSSFolder(entries, size, fingerprint=f"pascal5i:{root.resolve()}:{split}:{fold}:{size}")


def coco20i(root: str | Path, fold: int, split: str = "val", size: int = 400) -> FSSFolder:
    """COCO-20i images of one fold and split.

    Args:
        root: the HSNet-layout folder (see the module docstring).
        fold: 0 … 3.
        split: ``"trn"`` or ``"val"``.
        size: side images and masks are resized to.

    Returns:
        The dataset; each image lists every class the split pairs it with.

    Raises:
        FileNotFoundError: the split file or listed images are missing.
        pickle.UnpicklingError: the split file refers to any class (only plain data is read).
        ValueError: the split file does not hold a dict.
    """
    root = Path(root)
    listing = root / "splits" / "coco" / split / f"fold{fold}.pkl"
    if not listing.exists():
        raise FileNotFoundError(f"{listing} not found: not an HSNet-layout COCO-20i folder")
    classwise = _DataOnly(io.BytesIO(listing.read_bytes())).load()
    if not isinstance(classwise, dict):
        raise ValueError(f"{listing} holds a {type(classwise).__name__}; expected {{class id: [image names]}}")
    pairs = [(name, int(c)) for c, names in classwise.items() for name in names]
    base = root / "COCO2014"
    entries = [(base / name, base / "annotations" / Path(name).with_suffix(".png"), classes)
               for name, classes in _group(pairs).items()]
    return FSSFolder(entries, size, fingerprint=f"coco20i:{root.resolve()}:{split}:{fold}:{size}")
