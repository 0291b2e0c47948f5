"""Dichotomous image segmentation (DIS): one salient object with very fine structure, at high resolution.

Two sources with the same items (``image`` ``(3, H, W)`` float in ``[-1, 1]``, ``mask`` ``(1, H, W)``
float in ``{0, 1}``, ``edge`` ``(1, H, W)`` float in ``{0, 1}``, ``name`` (str), ``index`` (int)):

* :class:`DISFolder` reads DIS5K (``root/DIS-TR``, ``root/DIS-VD``, ``root/DIS-TE1`` … ``root/DIS-TE4``,
  each with ``im/<stem>.jpg`` and ``gt/<stem>.png``) or any folder of image / mask pairs with matching
  stems. :func:`dis5k_splits` lists the DIS5K splits present under a root.
* :class:`DISScenes` generates the embedded default: single-object scenes with thin structures (wire
  meshes, branching curves, truss lattices, thick-and-thin digit strokes, the horse silhouette of
  scikit-image) over a textured, cluttered background, as a pure function of
  ``(seed, index, size, difficulty)``.

Edge ground truth (:func:`edge_from_mask`) is the band ``dilation − erosion`` of the binary mask with a
5 × 5 square, i.e. the pixels within 2 px (chessboard distance) of the object's boundary. For a folder it
is computed once per mask at the mask's resolution and cached as a PNG beside the masks (``gt/`` →
``gt_edge/``, same stems, 0 / 255), written atomically; a cached edge newer than its mask is reused.

Masks accepted (anything else is refused with the file named and what is accepted said):

* 8-bit grey (``L``) or bilevel (``1``); an RGB / RGBA / palette / grey-alpha mask only when it is
  opaque and its colour channels are equal (then it is read as grey). 16-bit and float masks are
  refused rather than converted: whether 255 or 65535 means "object" cannot be told from the file.
* Values ``>= 128`` are the object. Anti-aliased grey is accepted: every grey pixel (32 … 223) must have
  a near-black (< 32) or near-white (>= 224) pixel within 2 px, as anti-aliased boundaries, sub-pixel
  wires and JPEG ringing have; a mask with wide grey areas is a soft map (a saliency or probability
  map), not a binary mask, and is refused. (Grey thinner than half a pixel's coverage, below 128, is
  background once thresholded.)
* A mask holding only the values 0 and 1 is refused (a 0/1 label map: thresholded at 128 it would be
  silently empty); save it as 0 / 255.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from skimage.draw import ellipse, polygon
from torch.utils.data import DataLoader, Dataset

from difffeat.store import atomic_write

__all__ = [
    "DIS5K_SPLITS",
    "SCENE_SPLIT_SEEDS",
    "DISDataModule",
    "DISFileError",
    "DISFolder",
    "DISScenes",
    "dis5k_splits",
    "edge_from_mask",
    "read_mask",
    "render_dis_scene",
]

#: the DIS5K split folders, in their usual order (training, validation, the four test subsets)
DIS5K_SPLITS = ("DIS-TR", "DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
#: seeds of the generated default's splits
SCENE_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
EDGE_WIDTH = 5
_GREY = (32, 224)  # values in [32, 224) are "grey": neither near-black nor near-white
_SCENE_KINDS = ("mesh", "branches", "lattice", "digit", "horse")


class DISFileError(ValueError):
    """An image or mask file that cannot be used (its path is in the message)."""


def edge_from_mask(mask: np.ndarray, width: int = EDGE_WIDTH) -> np.ndarray:
    """The edge band of a binary mask: ``dilation − erosion`` with a ``width × width`` square.

    Outside the image counts as "no change" (dilation pads with background, erosion with object), as
    OpenCV's ``dilate`` / ``erode`` and scikit-image's reflecting ``dilation`` / ``erosion`` do: an object
    that touches the image border gets no edge along the border itself.

    Args:
        mask: ``(H, W)`` bool (or 0/1) array.
        width: side of the square structuring element (odd).

    Returns:
        ``(H, W)`` bool array.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"edge_from_mask takes an (H, W) mask, got shape {mask.shape}")
    m = mask.view(np.uint8)  # square structuring elements are separable: 1-D max / min filters
    grown = ndimage.maximum_filter(m, size=width, mode="constant", cval=0)
    shrunk = ndimage.minimum_filter(m, size=width, mode="constant", cval=1)
    return grown > shrunk


# ----------------------------------------------------------------------------------------------- files


def _open(path: Path, what: str) -> Image.Image:
    """Opens and fully decodes an image file, so truncated files fail here, with their name."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DISFileError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); it is missing, truncated or "
                           f"not an image") from e
    return img


def read_image(path: str | Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (grey and CMYK images are converted).

    EXIF orientation is deliberately not applied: DIS5K's masks are aligned with the stored pixels.

    Args:
        path: image file.

    Returns:
        The decoded pixels.

    Raises:
        DISFileError: unreadable or truncated file.
    """
    return np.asarray(_open(Path(path), "image").convert("RGB"))


def read_mask(path: str | Path) -> np.ndarray:
    """A binary mask file as an ``(H, W)`` bool array (see the module docstring for what is accepted).

    Args:
        path: mask file.

    Returns:
        ``True`` where the 8-bit value is ``>= 128``.

    Raises:
        DISFileError: unreadable file, 16-bit / float / colour / transparent mask, a 0/1 label map, or a
            soft (non-binary) map; the message names the file and says what is accepted.
    """
    path = Path(path)
    img = _open(path, "mask")
    accepted = ("accepted: 8-bit grey (or RGB with equal channels) with 0 = background and 255 = object; "
                "values >= 128 count as object, anti-aliased grey only along the boundary")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raise DISFileError(f"mask {path} is a {img.mode} ({'16/32-bit' if img.mode != 'F' else 'float'}) image; "
                           f"{accepted}. Convert it to 8-bit first (is the object 255 or 65535?)")
    if img.mode == "1":
        grey = np.asarray(img.convert("L"))
    elif img.mode == "L":
        grey = np.asarray(img)
    elif img.mode in ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr"):
        rgba = np.asarray(img.convert("RGBA"))
        if (rgba[..., 3] != 255).any():
            raise DISFileError(f"mask {path} ({img.mode}) has transparent pixels; {accepted}")
        if not ((rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 1] == rgba[..., 2]).all()):
            raise DISFileError(f"mask {path} is a colour ({img.mode}) image whose channels differ; {accepted}")
        grey = rgba[..., 0]
    else:
        raise DISFileError(f"mask {path} has the unsupported mode {img.mode}; {accepted}")
    if grey.size and grey.max() == 1:
        raise DISFileError(f"mask {path} holds only the values 0 and 1 (a 0/1 label map, empty once thresholded "
                           f"at 128); {accepted}. Save it as 0 / 255")
    grey_px = (grey >= _GREY[0]) & (grey < _GREY[1])
    if grey_px.any():
        clean = ndimage.maximum_filter((~grey_px).view(np.uint8), size=EDGE_WIDTH, mode="constant", cval=0) > 0
        stray = grey_px & ~clean
        if stray.any():
            y, x = np.argwhere(stray)[0]
            raise DISFileError(f"mask {path} is not binary: {int(stray.sum())} grey pixels (values {_GREY[0]}–"
                               f"{_GREY[1] - 1}) have no black or white pixel within 2 px, e.g. value "
                               f"{int(grey[y, x])} at (y={y}, x={x}): a soft map; {accepted}")
    return grey >= 128


def _listing(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in suffixes:
            continue
        if p.stem in files:
            raise DISFileError(f"{folder} holds two files with the stem {p.stem!r}: {files[p.stem].name} and {p.name}")
        files[p.stem] = p
    return files


def dis5k_splits(root: str | Path) -> dict[str, Path]:
    """The DIS5K split folders present under ``root``.

    Args:
        root: the DIS5K folder (holding ``DIS-TR``, ``DIS-VD``, ``DIS-TE1`` … ``DIS-TE4``).

    Returns:
        ``{split name: folder}`` in :data:`DIS5K_SPLITS` order, for the splits with an ``im/`` folder.

    Raises:
        FileNotFoundError: ``root`` is missing or holds none of the splits (the expected names listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DIS5K root {root} is not a folder")
    found = {s: root / s for s in DIS5K_SPLITS if (root / s / "im").is_dir()}
    if not found:
        raise FileNotFoundError(f"{root} holds none of the DIS5K splits {', '.join(DIS5K_SPLITS)} "
                                f"(each a folder with im/ and gt/)")
    return found


def _resize(t: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``(C, H, W)`` float resized; ``mode`` bilinear (antialiased), nearest, or area."""
    if tuple(t.shape[-2:]) == size:
        return t
    if mode == "bilinear":
        return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if mode == "nearest":
        return F.interpolate(t[None], size=size, mode="nearest-exact")[0]
    return F.interpolate(t[None], size=size, mode="area")[0]


class DISFolder(Dataset):
    """Image / mask pairs with matching stems: one DIS5K split, or any such folder.

    Either ``root`` (a folder with ``im/`` and ``gt/``, such as ``DIS5K/DIS-TR``) or both ``image_dir``
    and ``mask_dir``. Pairing is checked at construction; each file is decoded and checked when its item
    is read.

    Resizing (``size``, for training batches): the image bilinearly with antialiasing; the mask by
    ``mask_resize`` — ``"area"`` (default: the fraction of each output pixel the object covers,
    thresholded at 0.5, i.e. what bilinear-then-threshold does when shrinking, without aliasing) or
    ``"nearest"`` (every output pixel takes one input pixel: thin parts survive as broken lines). The edge
    is computed and cached at the mask's own resolution and resized by area with any coverage counting
    (``> 0``), so the band stays unbroken when shrunk; recomputing it at the output size would change
    its width with the scale factor.

    Args:
        root: a folder with ``im/`` and ``gt/``.
        image_dir: the images (instead of ``root``).
        mask_dir: the masks (instead of ``root``).
        size: output side (int) or ``(H, W)``; ``None`` keeps each image's own size (batch size 1, or the
            full-resolution evaluation DIS reports).
        mask_resize: ``"area"`` or ``"nearest"``.
        edge_dir: where edges are cached (default: beside the masks, ``<mask_dir>_edge``, e.g. ``gt_edge``).
        cache_edges: write computed edges to ``edge_dir`` (a folder that cannot be written is warned
            about once and edges are then computed on each read).

    Raises:
        FileNotFoundError: a folder is missing; ``root`` is a DIS5K root rather than one split (the splits
            found are named).
        DISFileError: no images; image and mask stems that do not pair up (counts and a few named); two
            files with one stem.
        ValueError: a bad ``size`` or ``mask_resize``.
    """

    def __init__(self, root: str | Path | None = None, *, image_dir: str | Path | None = None,
                 mask_dir: str | Path | None = None, size: int | tuple[int, int] | None = None,
                 mask_resize: Literal["area", "nearest"] = "area", edge_dir: str | Path | None = None,
                 cache_edges: bool = True) -> None:
        if (root is None) == (image_dir is None or mask_dir is None):
            raise ValueError("give either root (a folder with im/ and gt/) or both image_dir and mask_dir")
        if root is not None:
            root = Path(root)
            if not (root / "im").is_dir():
                if root.is_dir() and any((root / s / "im").is_dir() for s in DIS5K_SPLITS):
                    raise FileNotFoundError(f"{root} is a DIS5K root; pass one split folder, e.g. {root / 'DIS-TR'} "
                                            f"(found {', '.join(dis5k_splits(root))})")
                raise FileNotFoundError(f"{root / 'im'} is not a folder: {root} is not an im/ + gt/ folder")
            image_dir, mask_dir = root / "im", root / "gt"
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for d in (self.image_dir, self.mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} is not a folder")
        if mask_resize not in ("area", "nearest"):
            raise ValueError(f"mask_resize must be 'area' or 'nearest', got {mask_resize!r}")
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be a positive int or (H, W), got {size}")
        self.size, self.mask_resize = size, mask_resize
        default_edges = self.mask_dir.with_name(self.mask_dir.name + "_edge")
        self.edge_dir = Path(edge_dir) if edge_dir is not None else default_edges
        self.cache_edges = cache_edges
        images, masks = _listing(self.image_dir, IMAGE_SUFFIXES), _listing(self.mask_dir, MASK_SUFFIXES)
        if not images:
            raise DISFileError(f"{self.image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        unpaired = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
        if any(unpaired):
            parts = [f"{len(u)} {kind} without {other} in {d} (e.g. {', '.join(u[:5])})"
                     for u, kind, other, d in zip(unpaired, ("images", "masks"), ("a mask", "an image"),
                                                  (self.mask_dir, self.image_dir), strict=True) if u]
            raise DISFileError(f"image and mask stems do not pair up: {'; '.join(parts)}")
        self.names = sorted(images)
        self.pairs = [(images[n], masks[n]) for n in self.names]
        self._warned = False

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def fingerprint(self) -> str:
        """Identity of the content: file names and byte sizes, and the output options."""
        h = hashlib.sha256()
        for image, mask in self.pairs:
            h.update(f"{image.name}:{image.stat().st_size}:{mask.name}:{mask.stat().st_size};".encode())
        return f"dis-folder-v1:{self.size}:{self.mask_resize}:{h.hexdigest()[:16]}"

    def edge_path(self, i: int) -> Path:
        """Where the edge of item ``i`` is cached."""
        return self.edge_dir / f"{self.names[i]}.png"

    def _edge(self, i: int, mask: np.ndarray) -> np.ndarray:
        """The cached edge if it is newer than its mask and of its size, else computed (and cached)."""
        path, mask_path = self.edge_path(i), self.pairs[i][1]
        try:
            if path.stat().st_mtime_ns >= mask_path.stat().st_mtime_ns:
                with Image.open(path) as img:
                    cached = np.asarray(img.convert("L")) >= 128
                if cached.shape == mask.shape:
                    return cached
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            pass  # missing, stale or damaged cache entry: recompute
        edge = edge_from_mask(mask)
        if self.cache_edges:
            buf = io.BytesIO()
            Image.fromarray(edge.astype(np.uint8) * 255).save(buf, format="PNG")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, buf.getvalue())
            except OSError as e:
                if not self._warned:
                    warnings.warn(f"cannot cache DIS edges in {self.edge_dir} ({e}); computing them on each read",
                                  stacklevel=2)
                    self._warned = True
        return edge

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One pair.

        Args:
            i: item index.

        Returns:
            ``image`` ``(3, H, W)`` in ``[-1, 1]``, ``mask`` and ``edge`` ``(1, H, W)`` in ``{0, 1}`` (float32),
            ``name`` (the stem) and ``index``; ``(H, W)`` is ``size`` when given.

        Raises:
            DISFileError: an unreadable image or mask, a mask that is not accepted, or a mask whose size
                differs from its image's (both files and sizes named).
        """
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} pairs in {self.image_dir}")
        image_path, mask_path = self.pairs[i]
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DISFileError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (W x H) but its image "
                               f"{image_path} is {image.shape[1]}x{image.shape[0]}; they must be the same size")
        edge = self._edge(i, mask)
        img_t = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
        mask_t = torch.from_numpy(mask)[None].float()
        edge_t = torch.from_numpy(edge)[None].float()
        if self.size is not None:
            img_t = _resize(img_t, self.size, "bilinear").clamp(-1, 1)
            if self.mask_resize == "area":
                mask_t = (_resize(mask_t, self.size, "area") >= 0.5).float()
            else:
                mask_t = _resize(mask_t, self.size, "nearest")
            edge_t = (_resize(edge_t, self.size, "area") > 0).float()
        return {"image": img_t, "mask": mask_t, "edge": edge_t, "name": self.names[i], "index": i}

    @classmethod
    def dis5k(cls, root: str | Path, split: str = "DIS-TR", **kwargs: Any) -> DISFolder:
        """One DIS5K split (``"DIS-TR"``, ``"DIS-VD"``, ``"DIS-TE1"`` … ``"DIS-TE4"``) under ``root``.

        Raises:
            KeyError: an unknown or absent split (the splits found are listed).
        """
        found = dis5k_splits(root)
        if split not in found:
            raise KeyError(f"split {split!r} not found under {root}; found {', '.join(found)} "
                           f"(DIS5K splits: {', '.join(DIS5K_SPLITS)})")
        return cls(found[split], **kwargs)


# ------------------------------------------------------------------------------------ generated scenes


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@cache
def _footprint(width: int) -> np.ndarray:
    """A round brush ``width`` pixels across (``width × width``; 1 → a single pixel, 2 → a 2×2 square)."""
    c = (width - 1) / 2
    yy, xx = np.mgrid[0:width, 0:width]
    return (yy - c) ** 2 + (xx - c) ** 2 <= (width / 2) ** 2 + 1e-6


@cache
def _horse() -> np.ndarray:
    from skimage.data import horse

    return ~horse()  # the file stores the horse as False on a True background


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target


class _Canvas:
    """Strokes grouped by width: centre lines are collected, then drawn and stamped with round brushes at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.lines: dict[int, np.ndarray] = {}

    def _layer(self, width: int) -> np.ndarray:
        return self.lines.setdefault(max(1, int(width)), np.zeros((self.size, self.size), bool))

    def segments(self, starts: np.ndarray, ends: np.ndarray, width: int) -> None:
        """Straight strokes from ``starts[k]`` to ``ends[k]`` (``(n, 2)`` arrays, or one ``(y, x)`` each)."""
        pair = (np.atleast_2d(np.asarray(starts, float)), np.atleast_2d(np.asarray(ends, float)))
        self.pending.setdefault(max(1, int(width)), []).append(pair)

    def polyline(self, pts: np.ndarray, width: int) -> None:
        """Joined strokes through ``pts`` (``(n, 2)`` of ``(y, x)``)."""
        pts = np.asarray(pts, float)
        self.segments(pts[:-1], pts[1:], width)

    def pixels(self, where: np.ndarray, width: int) -> None:
        """Centre-line pixels given as a mask (a skeleton, or a filled shape with width 1)."""
        self._layer(width)[where] = True

    def _draw(self) -> None:
        """Rasterises the collected segments, vectorised over all segments of a width.

        One DDA line per segment: sampled once per pixel of its longer axis and rounded (8-connected, one
        pixel thick).
        """
        for width, chunks in self.pending.items():
            starts = np.concatenate([c[0] for c in chunks])
            ends = np.concatenate([c[1] for c in chunks])
            steps = np.ceil(np.abs(ends - starts).max(1)).astype(int) + 1
            seg = np.repeat(np.arange(len(steps)), steps)
            k = np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)
            t = (k / np.maximum(steps - 1, 1)[seg])[:, None]
            pts = np.rint(starts[seg] + t * (ends[seg] - starts[seg])).astype(int)
            keep = ((pts >= 0) & (pts < self.size)).all(1)
            self._layer(width)[pts[keep, 0], pts[keep, 1]] = True
        self.pending = {}

    def mask(self) -> np.ndarray:
        """The union of every group's centre line stamped with its brush (fast for sparse lines)."""
        self._draw()
        pad = max(self.lines, default=1)
        out = np.zeros((self.size + 2 * pad, self.size + 2 * pad), bool)
        for width, centre in self.lines.items():
            ys, xs = np.nonzero(centre)
            fy, fx = np.nonzero(_footprint(width))
            shift = pad - (width - 1) // 2
            out[(ys[:, None] + (fy + shift)).ravel(), (xs[:, None] + (fx + shift)).ravel()] = True
        return out[pad:pad + self.size, pad:pad + self.size]


def _widths(size: int, difficulty: float) -> tuple[int, int]:
    """Thinnest and thickest stroke widths: 1 px at difficulty 1, about ``size / 50`` at 0."""
    thin = max(1, round(1 + (1 - difficulty) * (size / 50 - 1)))
    return thin, max(thin + 1, round(thin * (3 - difficulty) + size / 128))


def _resample(a: np.ndarray, shape: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    """A float ``(h, w)`` array resized to ``shape`` by PIL (much faster than ``scipy.ndimage.zoom``)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F").resize(shape[::-1], method))


def _rot(a: float) -> np.ndarray:
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _mesh(canvas: _Canvas, rng: np.random.Generator, size: int, d: float, thin: int, thick: int) -> np.ndarray:
    """A wire mesh (two families of parallel wires) inside an elliptic or polygonal frame."""
    c, r = size / 2 + rng.uniform(-0.05, 0.05, 2) * size, rng.uniform(0.3, 0.42) * size
    region = np.zeros((size, size), bool)
    if rng.random() < 0.5:
        axes = r, r * rng.uniform(0.6, 1.0)
        region[ellipse(c[0], c[1], *axes, shape=(size, size), rotation=rng.uniform(0, np.pi))] = 1
    else:
        k = int(rng.integers(3, 7))
        t = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(k) / k + rng.uniform(-0.2, 0.2, k)
        region[polygon(c[0] + r * np.sin(t), c[1] + r * np.cos(t), (size, size))] = 1
    spacing = rng.uniform(0.035, 0.07) * size * (1.3 - 0.6 * d) + 2 * thin
    wires = _Canvas(size)
    first = rng.uniform(0, np.pi)
    for a in (first, first + rng.uniform(np.pi / 4, np.pi / 2)):
        normal, along = np.array([np.sin(a), np.cos(a)]), np.array([np.cos(a), -np.sin(a)])
        for off in np.arange(-size, size, spacing) + rng.uniform(0, spacing):
            base = c + off * normal
            wires.segments(base - size * along, base + size * along, thin if rng.random() < 0.7 else thin + 1)
    inner = ndimage.minimum_filter(region.view(np.uint8), size=2 * max(1, thick // 2) + 1, mode="constant", cval=0)
    canvas.pixels(region & (inner == 0), 1)  # the frame: the region's outer band of about thick / 2
    return wires.mask() & region


def _branches(canvas: _Canvas, rng: np.random.Generator, size: int, d: float, thin: int, thick: int) -> None:
    """A branching plant / coral / tree: curved limbs that fork and thin out towards the tips."""
    depth = 3 + round(2 * d)
    stack = [(np.array([size * rng.uniform(0.8, 0.95), size * rng.uniform(0.35, 0.65)]),
              -np.pi / 2 + rng.uniform(-0.3, 0.3), size * rng.uniform(0.22, 0.3), 0)]
    while stack:
        p, a, length, level = stack.pop()
        width = round(thick + (thin - thick) * level / depth)
        steps = max(2, int(length / (size / 40)))
        pts = [p]
        for _ in range(steps):
            a += rng.normal(0, 0.18)
            pts.append(pts[-1] + (length / steps) * np.array([np.sin(a), np.cos(a)]))
        canvas.polyline(np.array(pts), width)
        if level < depth:
            for _ in range(int(rng.integers(2, 4))):
                stack.append((pts[int(rng.integers(steps // 2, steps + 1))], a + rng.uniform(-0.9, 0.9),
                              length * rng.uniform(0.55, 0.8), level + 1))


def _lattice(canvas: _Canvas, rng: np.random.Generator, size: int, d: float, thin: int, thick: int) -> None:
    """A truss (tower or crane arm): two chords, rungs and crossed diagonal braces, rotated."""
    h, base, top = size * rng.uniform(0.6, 0.8), size * rng.uniform(0.18, 0.3), size * rng.uniform(0.05, 0.15)
    panels = int(rng.integers(5, 8 + int(6 * d)))
    ys = np.linspace(h / 2, -h / 2, panels + 1)
    half = np.linspace(base, top, panels + 1) / 2
    rot, c = _rot(rng.uniform(-0.6, 0.6)), np.array([size / 2, size / 2]) + rng.uniform(-0.05, 0.05, 2) * size
    left = np.stack([ys, -half], 1) @ rot.T + c
    right = np.stack([ys, half], 1) @ rot.T + c
    canvas.polyline(left, thick)
    canvas.polyline(right, thick)
    brace = max(thin, (thin + thick) // 3)
    for k in range(panels + 1):
        canvas.segments(left[k], right[k], brace)
        if k < panels:
            canvas.segments(left[k], right[k + 1], thin)
            if rng.random() < 0.5 + 0.5 * d:
                canvas.segments(right[k], left[k + 1], thin)
    tip = (left[-1] + right[-1]) / 2
    canvas.segments(tip, tip + (rot @ np.array([-1.0, 0])) * size * 0.08, thin)  # an antenna mast


def _digit(canvas: _Canvas, rng: np.random.Generator, size: int, d: float, thin: int, thick: int) -> None:
    """A handwritten digit's skeleton redrawn with strokes that swell and thin (a broad-nib pen)."""
    from skimage.morphology import skeletonize

    images, _ = _digits()
    n = int(size * rng.uniform(0.6, 0.8))
    big = _resample(images[int(rng.integers(len(images)))], (n, n), Image.Resampling.BICUBIC) > 0.4
    skeleton = skeletonize(big)
    y, x = (int(v) for v in rng.integers(0, size - n + 1, 2))
    local = np.zeros((size, size), bool)
    local[y:y + n, x:x + n] = skeleton[:n, :n]
    pen = rng.uniform(0, np.pi)  # the nib's angle: strokes along it are thin, across it thick
    gy, gx = np.gradient(ndimage.gaussian_filter(big.astype(np.float32), 2))
    across = np.abs(np.sin(np.arctan2(gy, gx) - pen))
    field = np.zeros((size, size), np.float32)
    field[y:y + n, x:x + n] = across[:n, :n]
    widths = np.rint(thin + (thick - thin) * field).astype(int)
    for w in np.unique(widths[local]):
        canvas.pixels(local & (widths == w), int(w))


def _horse_shape(canvas: _Canvas, rng: np.random.Generator, size: int, d: float, thin: int, thick: int) -> None:
    """scikit-image's horse silhouette, scaled, mirrored at random; tail and mane hair added by :func:`_hair`."""
    horse = _horse()
    scale = size * rng.uniform(0.65, 0.9) / max(horse.shape)
    shape = (max(1, round(horse.shape[0] * scale)), max(1, round(horse.shape[1] * scale)))
    small = _resample(horse.astype(np.float32), shape, Image.Resampling.BILINEAR) > 0.5
    if rng.random() < 0.5:
        small = small[:, ::-1]
    h, w = small.shape
    y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    local = np.zeros((size, size), bool)
    local[y:y + h, x:x + w] = small
    canvas.pixels(local, 1)


_DRAW = {"mesh": _mesh, "branches": _branches, "lattice": _lattice, "digit": _digit, "horse": _horse_shape}


def _hair(mask: np.ndarray, rng: np.random.Generator, size: int, d: float, thin: int) -> np.ndarray:
    """A few thin wavy strands (hair, whiskers, loose wires) growing out of the object's boundary."""
    strands = _Canvas(size)
    boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    if len(boundary) == 0:
        return mask
    centre = boundary.mean(0)
    for _ in range(int(rng.integers(2, 4 + int(8 * d)))):
        p = boundary[int(rng.integers(len(boundary)))].astype(float)
        a = np.arctan2(*(p - centre)) + rng.normal(0, 0.4)  # outwards
        pts = [p]
        for _ in range(int(rng.integers(6, 14))):
            a += rng.normal(0, 0.25)
            pts.append(pts[-1] + size * 0.012 * np.array([np.sin(a), np.cos(a)]))
        strands.polyline(np.array(pts), thin)
    return mask | strands.mask()


def _smooth_noise(rng: np.random.Generator, channels: int, size: int, cells: int) -> np.ndarray:
    """Smooth noise ``(channels, size, size)`` with unit spread: a ``cells × cells`` grid upsampled (fast)."""
    grid = rng.standard_normal((channels, cells, cells)).astype(np.float32)
    field = np.stack([_resample(g, (size, size), Image.Resampling.BICUBIC) for g in grid])
    return (field - field.mean()) / np.float32(field.std() + 1e-8)


def _background(rng: np.random.Generator, size: int, d: float, thin: int) -> np.ndarray:
    """A textured noisy background ``(3, size, size)`` in ``[0, 1]`` with thin clutter at higher difficulty."""
    ramp = np.arange(size, dtype=np.float32) / size
    f, theta = rng.uniform(3, 20), rng.uniform(0, np.pi)
    stripes = np.sin(np.float32(2 * np.pi * f) * (ramp[None] * np.float32(np.cos(theta))
                                                  + ramp[:, None] * np.float32(np.sin(theta))))
    img = (rng.uniform(0.2, 0.8, (3, 1, 1)).astype(np.float32) + 0.12 * _smooth_noise(rng, 3, size, 6)
           + 0.05 * _smooth_noise(rng, 1, size, 40) + np.float32(rng.uniform(0.02, 0.08)) * stripes)
    clutter = _Canvas(size)
    for _ in range(round(12 * d)):  # distractor lines and twigs that are not the object
        p = rng.uniform(0, size, 2)
        a, pts = rng.uniform(0, 2 * np.pi), [p]
        for _ in range(int(rng.integers(3, 10))):
            a += rng.normal(0, 0.3)
            pts.append(pts[-1] + size * 0.03 * np.array([np.sin(a), np.cos(a)]))
        clutter.polyline(np.array(pts), thin + int(rng.integers(0, 2)))
    lines = clutter.mask()
    if lines.any():
        img[:, lines] = rng.uniform(0, 1, (3, 1)).astype(np.float32)
    return img


def render_dis_scene(index: int, size: int = 256, seed: int = 0, difficulty: float = 0.5) -> dict[str, Any]:
    """One generated DIS scene as numpy arrays: a pure function of ``(seed, index, size, difficulty)``.

    The object kind cycles with ``index`` (mesh, branches, lattice, digit, horse), so every five
    consecutive scenes hold each kind once; its geometry, colours and background are drawn from a
    stream seeded by all four arguments. ``difficulty`` (in ``[0, 1]``) sets the thinnest stroke (from
    about ``size / 50`` px at 0 down to 1 px at 1), the density of wires, braces and branches, the amount
    of thin hair growing out of the object, the clutter of distractor lines in the background, and lowers
    the object's colour contrast.

    Args:
        index: scene number.
        size: side in pixels (64–4096; the structures are meant for 256 and above, where a 1-px wire is
            fine relative to the object).
        seed: split seed (see :data:`SCENE_SPLIT_SEEDS`).
        difficulty: in ``[0, 1]``.

    Returns:
        ``image`` ``(3, size, size)`` float32 in ``[0, 1]``, ``mask`` ``(size, size)`` bool, ``kind`` (str).

    Raises:
        ValueError: size or difficulty out of range.
    """
    if not 64 <= size <= 4096:
        raise ValueError(f"DIS scene size must be in [64, 4096], got {size}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    kind = _SCENE_KINDS[index % len(_SCENE_KINDS)]
    rng = np.random.default_rng(_seed(f"dis-v1:{seed}:{index}:{size}:{float(difficulty)!r}"))
    thin, thick = _widths(size, difficulty)
    canvas = _Canvas(size)
    extra = _DRAW[kind](canvas, rng, size, difficulty, thin, thick)
    mask = canvas.mask() if extra is None else canvas.mask() | extra
    if rng.random() < 0.3 + 0.7 * difficulty:
        mask = _hair(mask, rng, size, difficulty, thin)
    image = _background(rng, size, difficulty, thin)
    local = image[:, mask].mean(1, keepdims=True) if mask.any() else image.mean((1, 2))[:, None]
    contrast = 0.45 - 0.25 * difficulty
    colour = rng.uniform(0, 1, (3, 1))
    colour = np.where(np.abs(colour - local) < contrast, np.where(local > 0.5, local - contrast, local + contrast),
                      colour)
    shade = 1 + 0.12 * _smooth_noise(rng, 1, size, 10)[0]
    image[:, mask] = colour * shade[mask]
    image += np.float32(0.015 + 0.03 * difficulty) * rng.standard_normal((3, size, size), dtype=np.float32)
    return {"image": np.clip(image, 0, 1, out=image), "mask": mask, "kind": kind}


class DISScenes(Dataset):
    """``length`` generated DIS scenes (rendered on access, deterministic), with the folder reader's items.

    Splits are seeds: :meth:`split` gives ``"train"`` seed 0, ``"val"`` seed 1, ``"test"`` seed 2
    (:data:`SCENE_SPLIT_SEEDS`). Edges are :func:`edge_from_mask` of the generated mask (not cached: they
    cost less than reading a PNG).

    Args:
        length: number of scenes.
        size: side in pixels (256 and above recommended; see :func:`render_dis_scene`).
        seed: split seed.
        difficulty: in ``[0, 1]``; at 1 the thinnest strokes are 1 px wide.
    """

    def __init__(self, length: int = 1000, size: int = 256, seed: int = 0, difficulty: float = 0.5) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not 64 <= size <= 4096:
            raise ValueError(f"DIS scene size must be in [64, 4096], got {size}")
        if not 0.0 <= difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
        self.length, self.size, self.seed, self.difficulty = length, size, seed, float(difficulty)

    @classmethod
    def split(cls, name: Literal["train", "val", "test"], length: int = 1000, size: int = 256,
              difficulty: float = 0.5) -> DISScenes:
        """The scenes of one split (``"train"``, ``"val"`` or ``"test"``: seeds 0, 1, 2).

        Raises:
            KeyError: an unknown split name (the valid names listed).
        """
        if name not in SCENE_SPLIT_SEEDS:
            raise KeyError(f"unknown split {name!r}; expected one of {', '.join(SCENE_SPLIT_SEEDS)}")
        return cls(length, size, SCENE_SPLIT_SEEDS[name], difficulty)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Scene ``i``: ``image`` ``(3, H, W)`` in ``[-1, 1]``, ``mask``, ``edge`` ``(1, H, W)``, ``name``, ``index``.

        Raises:
            IndexError: ``i`` outside ``0 … length - 1``.
        """
        if not 0 <= i < self.length:
            raise IndexError(f"scene {i} out of range for {self.length} scenes")
        s = render_dis_scene(i, self.size, self.seed, self.difficulty)
        return {"image": torch.from_numpy(s["image"]) * 2 - 1,
                "mask": torch.from_numpy(s["mask"])[None].float(),
                "edge": torch.from_numpy(edge_from_mask(s["mask"]))[None].float(),
                "name": f"dis-scene-{self.seed}-{i:06d}-{s['kind']}", "index": i}

    @property
    def fingerprint(self) -> str:
        """Scenes are a pure function of these arguments and the generator's version."""
        return f"dis-scenes-v1:{self.length}:{self.size}:{self.seed}:{self.difficulty!r}"


# -------------------------------------------------------------------------------------------- datamodule


class DISDataModule(L.LightningDataModule):
    """DIS training and evaluation batches from a folder tree (DIS5K by default) or the generated scenes.

    With ``root`` the splits are its sub-folders (each with ``im/`` and ``gt/``): ``train_split``,
    ``val_split`` and ``test_splits`` (DIS5K's four test subsets by default; several test splits give
    one test loader each, in that order, as DIS reports each subset). Without ``root`` the generated
    :class:`DISScenes` splits (seeds 0 / 1 / 2) are served, ``lengths`` scenes each.

    Training batches are resized to ``size``. DIS evaluates at each image's own resolution: set
    ``eval_full_resolution`` to serve validation and test images unresized (batch size 1 then).

    Args:
        root: the dataset folder (``None``: generated scenes).
        size: side of training (and, by default, evaluation) images.
        batch_size: batch size.
        num_workers: loader workers.
        train_split: training sub-folder.
        val_split: validation sub-folder (``None``: no validation).
        test_splits: test sub-folders.
        mask_resize: ``"area"`` or ``"nearest"`` (see :class:`DISFolder`).
        eval_full_resolution: folder validation / test at the original size, batch size 1.
        lengths: generated scenes per split (train, val, test).
        difficulty: difficulty of the generated scenes.
    """

    def __init__(self, root: str | Path | None = None, size: int = 256, batch_size: int = 4, num_workers: int = 0,
                 train_split: str = "DIS-TR", val_split: str | None = "DIS-VD",
                 test_splits: Sequence[str] = DIS5K_SPLITS[2:], mask_resize: Literal["area", "nearest"] = "area",
                 eval_full_resolution: bool = False, lengths: Sequence[int] = (1000, 100, 100),
                 difficulty: float = 0.5) -> None:
        super().__init__()
        if len(lengths) != 3:
            raise ValueError(f"lengths holds the train, val and test scene counts, got {lengths}")
        self.root = None if root is None else Path(root)
        self.size, self.batch_size, self.num_workers = size, batch_size, num_workers
        self.train_split, self.val_split, self.test_splits = train_split, val_split, list(test_splits)
        self.mask_resize, self.eval_full_resolution = mask_resize, eval_full_resolution
        self.lengths, self.difficulty = tuple(lengths), difficulty

    def _folder(self, split: str, evaluation: bool) -> DISFolder:
        assert self.root is not None
        size = None if evaluation and self.eval_full_resolution else self.size
        return DISFolder(self.root / split, size=size, mask_resize=self.mask_resize)

    def dataset(self, stage: Literal["train", "val", "test"]) -> list[Dataset]:
        """The datasets of a stage (one per test split for a folder)."""
        if self.root is None:
            n = self.lengths[("train", "val", "test").index(stage)]
            return [DISScenes.split(stage, n, self.size, self.difficulty)]
        if stage == "train":
            return [self._folder(self.train_split, False)]
        if stage == "val":
            return [] if self.val_split is None else [self._folder(self.val_split, True)]
        return [self._folder(s, True) for s in self.test_splits]

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        full = isinstance(data, DISFolder) and data.size is None
        return DataLoader(data, 1 if full else self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped."""
        return self._loader(self.dataset("train")[0], True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches (an empty list without a validation split)."""
        loaders = [self._loader(d, False) for d in self.dataset("val")]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """Test batches: one loader, or one per test split."""
        loaders = [self._loader(d, False) for d in self.dataset("test")]
        return loaders[0] if len(loaders) == 1 else loaders
