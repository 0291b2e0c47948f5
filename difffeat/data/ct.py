"""CT slices in Hounsfield units: DICOM / PNG / NPY readers, DICOM writing, and simulated multi-scanner pairs.

Readers (every bad input is a :class:`CTFileError` naming the file):

* :func:`read_dicom` — one DICOM slice with pydicom, pixel data to Hounsfield units through
  ``RescaleSlope`` / ``RescaleIntercept``. Refused: a file that is not DICOM, a modality other than ``CT``,
  no pixel data, no rescale tags, a compressed transfer syntax whose decoder is not installed, and
  non-finite values.
* :func:`read_series` — the DICOM slices of a folder ordered along the slice normal (``ImagePositionPatient``
  projected on the cross product of ``ImageOrientationPatient``'s two directions), else by
  ``InstanceNumber``, else by file name. Refused: mixed slice sizes, several series in one folder.
* :func:`read_ct_image` — a DICOM, ``.npy`` (float HU, 2-D) or ``.png`` file. A 16-bit PNG stores
  ``HU + 1024`` (the usual CT storage offset, so air at -1024 HU is 0); an 8-bit PNG has lost its HU and
  needs the display window it was saved with (``png_window=(level, width)``), else it is refused.
* :func:`window` — a display window ``(level, width)`` to ``[0, 1]``; :data:`WINDOWS` names the usual ones and
  :func:`header_window` reads the one a DICOM header recommends (``WindowCenter`` / ``WindowWidth``).
* :func:`normalize_hu` / :func:`denormalize_hu` — the models' HU-aware normalisation: HU clipped to
  :data:`HU_RANGE` ``(-1024, 1024)`` and mapped linearly to ``[-1, 1]``. The range covers air to dense bone
  (cortical bone and metal above +1024 saturate: none of the texture features looks there), and keeps
  lung (≈ -850) and soft tissue (0 … 100) apart by ~0.9 of the unit range, which a ``[-1024, 3071]``
  range would halve.
* :func:`write_dicom_series` — standardized slices as a new DICOM series (new ``SeriesInstanceUID``, one new
  ``SOPInstanceUID`` per slice, ``ImageType`` ``DERIVED, SECONDARY, AXIAL``, the source's geometry and rescale
  tags), written into a temporary folder renamed into place only when every slice is written.

Simulated scanners (the embedded default; the paper used patient scans of several vendors):

* **Phantoms** (:func:`make_phantom`): scikit-image's modified Shepp–Logan (randomly rotated, scaled and
  shifted, mapped to HU: outside air -1000, brain 40 HU, skull 1000 HU), procedural chest-like slices
  (body ellipse with a fat rim, two lungs with vessel dots and parenchymal texture, heart, spine, ribs,
  nodules; correlated Gaussian texture in every tissue), and pydicom's real slice ``CT_small.dcm``
  (resized, in HU). A tissue label map (:data:`TISSUES`: air, lung, fat, soft tissue, bone) is taken from
  the clean phantom's HU by thresholds (air < -900 ≤ lung < -500 ≤ fat < -30 ≤ soft < 200 ≤ bone).
* **Protocols** (:class:`Protocol`): HU → linear attenuation (``μ = μ_water (1 + HU/1000)``,
  μ_water = 0.02 / mm, a :data:`FOV_MM` 350 mm field of view), optional Gaussian slice blur (the
  partial-volume effect of a thicker slice, modelled in-plane as there is one slice), parallel-beam
  sinogram (``skimage.transform.radon``, ``views`` angles over 180°), Poisson counts ``Poisson(I0 ·
  exp(-p))`` for a dose ``I0`` photons per ray (``None``: noiseless), ``-log`` back to line integrals,
  filtered back-projection (``iradon``) with the protocol's filter (ramp, shepp-logan, cosine, hamming,
  hann), back to HU. :data:`STANDARD` (hamming, 10⁶ photons, slice blur σ 0.6 px) is the standard;
  :data:`TRAIN_PROTOCOLS` are the non-standard ones seen in training (sharp ramp kernels, low doses, soft
  hann with heavy blur); :data:`HELD_OUT_PROTOCOL` (cosine, 10⁴ photons, no blur: a filter never seen in
  training and a dose below the training range) is used in testing only.
* **Pairs** (:class:`SimulatedScanners`): item ``i`` is phantom ``i // P`` under protocol ``i % P`` paired
  with the same phantom under the standard protocol. Splits draw different phantoms (seeds 0 / 1 / 2 for
  train / val / test, :data:`SPLIT_SEEDS`); the test split also holds the real slice, and its protocols are
  the training ones plus the held-out one. The Poisson noise is seeded by (split seed, phantom, protocol).
* **CPU scale**: 64-px slices by default (a real slice is 512 px; one 64-px forward and back-projection
  takes ~16 ms), views = the slice side. Reconstructions are cached in memory per dataset, and on disk
  (``cache_dir``, one ``.npy`` per (phantom, protocol), written atomically) when asked.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from difffeat.store import atomic_write, replace_folder

__all__ = [
    "FILTERS",
    "HELD_OUT_PROTOCOL",
    "HU_RANGE",
    "SPLIT_SEEDS",
    "STANDARD",
    "TISSUES",
    "TRAIN_PROTOCOLS",
    "WINDOWS",
    "CTDataModule",
    "CTFileError",
    "CTSlice",
    "Protocol",
    "SimulatedScanners",
    "denormalize_hu",
    "header_window",
    "make_phantom",
    "normalize_hu",
    "read_ct_image",
    "read_dicom",
    "read_series",
    "simulate_scan",
    "tissue_labels",
    "window",
    "write_dicom_series",
]

#: HU range of the models' normalisation (clipped, then mapped to [-1, 1])
HU_RANGE = (-1024.0, 1024.0)
#: display windows (level, width) in HU
WINDOWS = {"lung": (-600.0, 1500.0), "soft_tissue": (40.0, 400.0), "bone": (400.0, 1800.0)}
#: filtered back-projection filters of ``skimage.transform.iradon``
FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
#: tissue classes of the label maps, in label order
TISSUES = ("air", "lung", "fat", "soft_tissue", "bone")
_TISSUE_EDGES = (-900.0, -500.0, -30.0, 200.0)
#: phantom seeds of the splits
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
#: field of view of a simulated slice (mm) and water's linear attenuation (1/mm, ~70 keV)
FOV_MM, MU_WATER = 350.0, 0.02
_PHANTOM_KINDS = ("chest", "chest", "shepp_logan")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")


class CTFileError(ValueError):
    """A CT file or folder that cannot be used (its path is in the message)."""


# ----------------------------------------------------------------------------------------- HU utilities


def normalize_hu(hu: np.ndarray | torch.Tensor, hu_range: Sequence[float] = HU_RANGE) -> Any:
    """HU clipped to ``hu_range`` and mapped linearly to ``[-1, 1]`` (array or tensor in, same kind out)."""
    lo, hi = float(hu_range[0]), float(hu_range[1])
    x = hu.clip(lo, hi) if isinstance(hu, np.ndarray) else hu.clamp(lo, hi)
    return (x - lo) / (hi - lo) * 2 - 1


def denormalize_hu(x: np.ndarray | torch.Tensor, hu_range: Sequence[float] = HU_RANGE) -> Any:
    """The inverse of :func:`normalize_hu` on ``[-1, 1]`` (values outside are clipped first)."""
    lo, hi = float(hu_range[0]), float(hu_range[1])
    x = x.clip(-1, 1) if isinstance(x, np.ndarray) else x.clamp(-1, 1)
    return (x + 1) / 2 * (hi - lo) + lo


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """A display window: HU in ``[level - width/2, level + width/2]`` to ``[0, 1]`` (clipped outside)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return np.clip((np.asarray(hu, np.float32) - (level - width / 2)) / width, 0, 1)


def tissue_labels(hu: np.ndarray) -> np.ndarray:
    """Tissue label map (indices into :data:`TISSUES`) of an HU slice by fixed HU thresholds."""
    return np.digitize(np.asarray(hu), _TISSUE_EDGES).astype(np.int64)


# ---------------------------------------------------------------------------------------------- readers


@dataclass
class CTSlice:
    """One slice: HU pixels and, for DICOM input, the header it came with (pixel data removed).

    Attributes:
        hu: ``(H, W)`` float32 Hounsfield units.
        path: the file.
        header: the pydicom dataset without its pixel data (``None`` for PNG / NPY input).
    """

    hu: np.ndarray
    path: Path
    header: Any = None


def _check_finite(hu: np.ndarray, path: Path) -> np.ndarray:
    bad = ~np.isfinite(hu)
    if bad.any():
        raise CTFileError(f"CT file {path}: {int(bad.sum())} of {hu.size} pixels are NaN or infinite")
    return hu


def _decoder_available(uid: Any) -> bool:
    """Whether pydicom can decode pixel data of this transfer syntax with the installed plugins."""
    if not uid.is_compressed:
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError, ImportError):
        return False


def read_dicom(path: str | Path) -> CTSlice:
    """One CT DICOM slice in Hounsfield units.

    Args:
        path: the DICOM file.

    Returns:
        The slice (HU and header).

    Raises:
        CTFileError: not DICOM, not CT, no pixel data or rescale tags, an undecodable compressed transfer
            syntax, a multi-frame or colour image, or non-finite values (the file is named).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise CTFileError(f"DICOM file {path} cannot be read ({type(e).__name__}: {e})") from e
    modality = ds.get("Modality")
    if modality != "CT":
        raise CTFileError(f"DICOM file {path} has modality {modality!r}; only CT ('CT') is accepted")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise CTFileError(f"DICOM file {path} has no pixel data")
    missing = [t for t in ("RescaleSlope", "RescaleIntercept") if ds.get(t) is None]
    if missing:
        raise CTFileError(f"DICOM file {path} lacks {' and '.join(missing)}: its pixels cannot be mapped to HU")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and not _decoder_available(ts):
        raise CTFileError(f"DICOM file {path} uses the compressed transfer syntax {ts.name} ({ts}) and no installed "
                          f"decoder handles it (install pylibjpeg with its plugins, or gdcm)")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many kinds for bad pixel data
        raise CTFileError(f"DICOM file {path}: pixel data cannot be decoded ({type(e).__name__}: {e})") from e
    if pixels.ndim != 2:
        raise CTFileError(f"DICOM file {path}: pixel data of shape {pixels.shape}; one grey 2-D slice expected "
                          f"(multi-frame and colour images are not supported)")
    try:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    except (TypeError, ValueError) as e:
        raise CTFileError(f"DICOM file {path}: rescale tags are not numbers ({e})") from e
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise CTFileError(f"DICOM file {path}: invalid rescale slope {slope} / intercept {intercept}")
    hu = _check_finite(pixels.astype(np.float32) * slope + intercept, path)
    header = copy.deepcopy(ds)
    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if tag in header:
            del header[tag]
    return CTSlice(hu, path, header)


def _read_png(path: Path, png_window: Sequence[float] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            a = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise CTFileError(f"PNG file {path} cannot be read ({type(e).__name__}: {e})") from e
    if a.ndim != 2:
        raise CTFileError(f"PNG file {path} has shape {a.shape}; a single-channel grey image is expected")
    if a.dtype == np.uint8:
        if png_window is None:
            raise CTFileError(f"PNG file {path} is 8-bit: its HU are lost; give the display window it was saved "
                              f"with (png_window=(level, width)) or save HU + 1024 as 16-bit")
        level, width = png_window
        return (level - width / 2 + a.astype(np.float32) / 255 * width).astype(np.float32)
    return a.astype(np.float32) - 1024  # 16-bit (PIL: uint16 / int32): HU + 1024


def read_ct_image(path: str | Path, png_window: Sequence[float] | None = None) -> CTSlice:
    """A CT slice from a DICOM, ``.npy`` (2-D float HU) or ``.png`` file (see the module docstring).

    Args:
        path: the file.
        png_window: ``(level, width)`` of an 8-bit PNG.

    Returns:
        The slice.

    Raises:
        CTFileError: unreadable or invalid file (named).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CTFileError(f"NPY file {path} cannot be read ({type(e).__name__}: {e})") from e
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
            raise CTFileError(f"NPY file {path} holds {a.dtype} of shape {a.shape}; a 2-D array of HU is expected")
        return CTSlice(_check_finite(a.astype(np.float32), path), path)
    if suffix == ".png":
        return CTSlice(_read_png(path, png_window), path)
    return read_dicom(path)


def _position(s: CTSlice) -> float | None:
    """The slice's position along its normal, from ImagePositionPatient and ImageOrientationPatient."""
    pos, ori = s.header.get("ImagePositionPatient"), s.header.get("ImageOrientationPatient")
    if pos is None or ori is None or len(pos) != 3 or len(ori) != 6:
        return None
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    return float(np.dot(normal, np.asarray(pos, float)))


def _order(slices: list[CTSlice]) -> list[CTSlice]:
    """Slices by position when every one has it, else by InstanceNumber when every one has it, else by name."""
    positions = [_position(s) for s in slices]
    if all(p is not None for p in positions):
        keys = positions
    elif all(s.header.get("InstanceNumber") is not None for s in slices):
        keys = [float(s.header.InstanceNumber) for s in slices]
    else:
        return sorted(slices, key=lambda s: s.path.name)
    return [s for _, _, s in sorted(zip(keys, [s.path.name for s in slices], slices, strict=True),
                                    key=lambda k: (k[0], k[1]))]


def header_window(header: Any) -> tuple[float, float] | None:
    """The display window ``(level, width)`` a DICOM header recommends (its first one), or ``None``."""
    centre, width = header.get("WindowCenter"), header.get("WindowWidth")
    if centre is None or width is None:
        return None
    def first(v: Any) -> float:  # a multi-valued tag: its first window
        return float(v[0]) if isinstance(v, Sequence) and not isinstance(v, str) else float(v)

    return first(centre), first(width)


def read_series(folder: str | Path) -> list[CTSlice]:
    """The DICOM slices of a folder (not recursive), ordered along the slice normal.

    Files are the ones with a DICOM suffix (``.dcm``, ``.dicom``, ``.ima``) or none; hidden files are skipped.
    Ordering: by ``ImagePositionPatient`` on the slice normal when every slice has it, else by
    ``InstanceNumber`` when every slice has it, else by file name.

    Args:
        folder: the series folder.

    Returns:
        The slices, first to last.

    Raises:
        FileNotFoundError: the folder is missing.
        CTFileError: no DICOM file, a bad file (named), slices of different sizes (both files named), or
            several series in one folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in _DICOM_SUFFIXES)
    if not files:
        raise CTFileError(f"DICOM folder {folder} holds no DICOM file (.dcm, .dicom, .ima or no suffix)")
    slices = [read_dicom(p) for p in files]
    first = slices[0]
    for s in slices[1:]:
        if s.hu.shape != first.hu.shape:
            raise CTFileError(f"DICOM series {folder} mixes slice sizes: {first.path.name} is "
                              f"{first.hu.shape[0]}x{first.hu.shape[1]}, {s.path.name} is "
                              f"{s.hu.shape[0]}x{s.hu.shape[1]}")
    series = {s.header.get("SeriesInstanceUID") for s in slices}
    if len(series) > 1:
        raise CTFileError(f"DICOM folder {folder} holds {len(series)} series ({', '.join(map(str, series))}); "
                          f"put one series per folder")
    return _order(slices)


# ---------------------------------------------------------------------------------------------- writing


def _stored(hu: np.ndarray, header: Any, path: Path) -> np.ndarray:
    """HU back to stored values with the header's rescale tags and pixel type (clipped to its range)."""
    slope, intercept = float(header.RescaleSlope), float(header.RescaleIntercept)
    bits = int(header.get("BitsStored", header.get("BitsAllocated", 16)))
    signed = int(header.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    stored = np.clip(np.rint((hu - intercept) / slope), lo, hi)
    allocated = int(header.get("BitsAllocated", 16))
    if allocated not in (8, 16, 32):
        raise CTFileError(f"DICOM template {path}: BitsAllocated {allocated} is not supported for writing")
    dtype = np.dtype(f"{'int' if signed else 'uint'}{allocated}")
    return stored.astype(dtype)


def write_dicom_series(slices: Sequence[tuple[np.ndarray, Any]], out_dir: str | Path,
                       description: str = "standardized", overwrite: bool = False,
                       names: Sequence[str] | None = None) -> list[Path]:
    """Writes HU slices as one new derived DICOM series, all or nothing.

    Each slice is written with its template header (the source slice's): every tag is kept (patient,
    study, geometry: ``ImagePositionPatient``, ``ImageOrientationPatient``, ``PixelSpacing``,
    ``SliceThickness``; ``RescaleSlope`` / ``RescaleIntercept``; pixel type), except a new
    ``SeriesInstanceUID`` shared by the series, a new ``SOPInstanceUID`` (and ``MediaStorageSOPInstanceUID``)
    per slice, ``ImageType`` ``DERIVED, SECONDARY, AXIAL``, ``SeriesDescription`` and
    ``DerivationDescription`` set to ``description``, and explicit-VR little-endian uncompressed pixel data.
    HU are rounded to stored values with the template's slope and intercept and clipped to its pixel
    type's range. The files go to a temporary folder beside ``out_dir``, renamed into place once all are
    written; after any error the temporary folder is removed.

    Args:
        slices: ``(hu, header)`` pairs; ``hu`` ``(Rows, Columns)`` of the header.
        out_dir: the folder to create.
        description: series and derivation description.
        overwrite: replace an existing ``out_dir``.
        names: file names (default ``slice_0000.dcm`` …).

    Returns:
        The written paths.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is off.
        CTFileError: a slice that does not fit its header.
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists; remove it or pass overwrite=True")
    if not slices:
        raise ValueError("no slice to write")
    names = list(names or [f"slice_{i:04d}.dcm" for i in range(len(slices))])
    if len(names) != len(slices) or len(set(names)) != len(names):
        raise ValueError(f"{len(slices)} slices need as many distinct file names, got {len(names)}")
    series_uid = generate_uid()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        written = []
        for (hu, header), name in zip(slices, names, strict=True):
            src = Path(getattr(header, "filename", None) or name)
            hu = np.asarray(hu, np.float32)
            if hu.shape != (int(header.Rows), int(header.Columns)):
                raise CTFileError(f"slice for {src}: shape {hu.shape} differs from its header's "
                                  f"{int(header.Rows)}x{int(header.Columns)}")
            _check_finite(hu, src)
            ds = copy.deepcopy(header)
            sop = generate_uid()
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, sop
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.SeriesDescription = ds.DerivationDescription = description
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            stored = _stored(hu, header, src)
            ds.PixelData = stored.tobytes()
            ds["PixelData"].VR = "OW" if stored.itemsize > 1 else "OB"
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            (tmp / name).write_bytes(buf.getvalue())
            written.append(out_dir / name)
        replace_folder(tmp, out_dir)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- phantoms


def _rng(*key: Any) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _texture(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-std correlated Gaussian texture (white noise smoothed with ``sigma`` px)."""
    t = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (t / (t.std() + 1e-8)).astype(np.float32)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0
             ) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    return ((x * c + y * s) / rx) ** 2 + ((-x * s + y * c) / ry) ** 2 <= 1


def _chest(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural chest-like slice in HU (coordinates in units of the half-side)."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    hu = np.full((size, size), -1000.0, np.float32)
    ry, rx = rng.uniform(0.55, 0.7), rng.uniform(0.75, 0.88)
    body = _ellipse(yy, xx, 0.0, 0.0, ry, rx)
    hu[body] = -100 + 15 * _texture(rng, size, 2.0)[body]  # subcutaneous fat
    inner = _ellipse(yy, xx, 0.0, 0.0, ry - 0.07, rx - 0.07)
    hu[inner] = 40 + 20 * _texture(rng, size, 1.5)[inner]  # muscle / soft tissue
    lung_tex = _texture(rng, size, 1.0)
    for side in (-1, 1):
        lung = _ellipse(yy, xx, rng.uniform(-0.1, 0.05), side * rng.uniform(0.33, 0.42), ry * rng.uniform(0.6, 0.75),
                        rx * rng.uniform(0.3, 0.38), side * rng.uniform(0.0, 0.3))
        hu[lung] = -850 + 40 * lung_tex[lung]
        for _ in range(int(rng.integers(6, 14))):  # vessels seen end-on
            cy, cx = rng.uniform(-0.5, 0.4), side * rng.uniform(0.2, 0.6)
            v = _ellipse(yy, xx, cy, cx, *(rng.uniform(0.015, 0.04, 2))) & lung
            hu[v] = 40
        if rng.random() < 0.6:  # nodule
            v = _ellipse(yy, xx, rng.uniform(-0.4, 0.3), side * rng.uniform(0.3, 0.5), *(rng.uniform(0.04, 0.08, 2)))
            hu[v & lung] = 20 + 30 * lung_tex[v & lung]
    heart = _ellipse(yy, xx, rng.uniform(-0.05, 0.1), rng.uniform(-0.1, 0.05), rng.uniform(0.18, 0.25),
                     rng.uniform(0.18, 0.26), rng.uniform(0, np.pi))
    hu[heart & inner] = 55 + 15 * _texture(rng, size, 1.0)[heart & inner]
    spine = _ellipse(yy, xx, ry - 0.2, 0.0, 0.08, 0.08)
    hu[spine] = 700 + 80 * _texture(rng, size, 1.0)[spine]
    hu[_ellipse(yy, xx, ry - 0.2, 0.0, 0.04, 0.04)] = 250  # cancellous core
    for angle in np.linspace(0.3, np.pi - 0.3, int(rng.integers(4, 7))):  # rib cross-sections along the rim
        cy, cx = (ry - 0.05) * np.sin(angle + np.pi), (rx - 0.05) * np.cos(angle)
        hu[_ellipse(yy, xx, -cy, cx, 0.03, 0.05, angle)] = 800
    return hu


def _shepp_logan(rng: np.random.Generator, size: int) -> np.ndarray:
    """The modified Shepp–Logan phantom, randomly rotated / scaled / shifted, in HU, with tissue texture."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import AffineTransform, resize, warp

    base = resize(shepp_logan_phantom(), (size, size), order=1, anti_aliasing=True)
    scale, angle = rng.uniform(0.8, 0.95), rng.uniform(-0.4, 0.4)
    shift = rng.uniform(-0.04, 0.04, 2) * size
    centre = np.array([size / 2, size / 2])
    tf = (AffineTransform(translation=-centre) + AffineTransform(scale=scale, rotation=angle)
          + AffineTransform(translation=centre + shift))
    v = warp(base, tf.inverse, order=1, mode="constant", cval=0.0)
    hu = np.full((size, size), -1000.0, np.float32)
    inside = v > 0.05
    hu[inside] = 40 + (v[inside] - 0.2) * 500 + 15 * _texture(rng, size, 1.2)[inside]
    hu[v > 0.85] = 1000 + 50 * _texture(rng, size, 1.0)[v > 0.85]
    return hu


@cache
def _ct_small() -> np.ndarray:
    from pydicom.data import get_testdata_file

    return read_dicom(get_testdata_file("CT_small.dcm")).hu


def _real_slice(size: int) -> np.ndarray:
    """The real slice ``CT_small.dcm`` (pydicom) resized to ``size``, outside the scan circle set to air."""
    from skimage.transform import resize

    hu = resize(_ct_small(), (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    hu[xx ** 2 + yy ** 2 > 0.85] = -1000
    return hu


def make_phantom(kind: Literal["chest", "shepp_logan", "real"], size: int = 64, seed: int = 0, index: int = 0
                 ) -> np.ndarray:
    """One clean phantom slice in HU, a pure function of its arguments.

    Args:
        kind: ``"chest"`` (procedural), ``"shepp_logan"`` (transformed Shepp–Logan) or ``"real"`` (CT_small).
        size: side in pixels.
        seed: phantom seed (the split's).
        index: phantom index.

    Returns:
        ``(size, size)`` float32 HU, air (-1000) outside the reconstruction circle.
    """
    if kind == "real":
        return _real_slice(size)
    makers = {"chest": _chest, "shepp_logan": _shepp_logan}
    if kind not in makers:
        raise KeyError(f"unknown phantom kind {kind!r}; expected one of chest, shepp_logan, real")
    hu = makers[kind](_rng("phantom", kind, seed, index, size), size)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    hu[xx ** 2 + yy ** 2 > 0.85] = -1000
    return hu


# -------------------------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    """A simulated acquisition and reconstruction protocol.

    Attributes:
        name: label.
        filter_name: ``iradon`` filter (one of :data:`FILTERS`).
        photons: photons per ray before the object (dose); ``None``: noiseless.
        blur: Gaussian slice-blur sigma in pixels (0: none).
        views: projection angles over 180° (``None``: the slice side).
    """

    name: str
    filter_name: str
    photons: float | None
    blur: float = 0.0
    views: int | None = None

    def __post_init__(self) -> None:
        if self.filter_name not in FILTERS:
            raise KeyError(f"unknown reconstruction filter {self.filter_name!r}; expected one of {', '.join(FILTERS)}")
        if self.photons is not None and self.photons <= 0:
            raise ValueError(f"protocol {self.name}: photons must be positive, got {self.photons}")


STANDARD = Protocol("standard", "hamming", 1e6, 0.6)
TRAIN_PROTOCOLS = (
    Protocol("sharp", "ramp", 1e5, 0.0),
    Protocol("sharp-lowdose", "ramp", 1.5e4, 0.3),
    Protocol("shepp-logan-lowdose", "shepp-logan", 2e4, 0.0),
    Protocol("smooth-thick", "hann", 5e4, 1.3),
)
HELD_OUT_PROTOCOL = Protocol("cosine-lowdose-heldout", "cosine", 1e4, 0.0)


def simulate_scan(hu: np.ndarray, protocol: Protocol, rng: np.random.Generator | None = None) -> np.ndarray:
    """Scans and reconstructs a clean HU slice under a protocol (see the module docstring).

    Args:
        hu: ``(N, N)`` clean slice in HU (air outside the inscribed circle).
        protocol: the protocol.
        rng: generator of the Poisson counts (required when the protocol has a dose).

    Returns:
        ``(N, N)`` float32 reconstruction in HU.
    """
    from skimage.transform import iradon, radon

    n = hu.shape[0]
    if hu.ndim != 2 or hu.shape[1] != n:
        raise ValueError(f"simulate_scan takes a square (N, N) slice, got {hu.shape}")
    pixel_mm = FOV_MM / n
    mu = np.clip(MU_WATER * (1 + hu.astype(np.float64) / 1000), 0, None)
    if protocol.blur > 0:
        mu = ndimage.gaussian_filter(mu, protocol.blur)
    c = n // 2  # radon(circle=True) needs zeros outside its inscribed circle (blur may spill a trace there)
    yy, xx = np.mgrid[:n, :n]
    mu[(yy - c) ** 2 + (xx - c) ** 2 > c ** 2] = 0
    theta = np.linspace(0.0, 180.0, protocol.views or n, endpoint=False)
    sino = radon(mu, theta, circle=True) * pixel_mm  # line integrals (dimensionless)
    if protocol.photons is not None:
        if rng is None:
            raise ValueError(f"protocol {protocol.name} has a dose: give the noise generator")
        counts = rng.poisson(protocol.photons * np.exp(-sino))
        sino = -np.log(np.maximum(counts, 1) / protocol.photons)
    rec = iradon(sino / pixel_mm, theta, filter_name=protocol.filter_name, circle=True)
    return (1000 * (rec / MU_WATER - 1)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- dataset


class SimulatedScanners(Dataset):
    """Paired (protocol → standard) reconstructions of seeded phantoms.

    Items: ``source`` / ``target`` ``(1, H, W)`` normalised (:func:`normalize_hu`), ``source_hu`` /
    ``target_hu`` ``(1, H, W)`` HU, ``clean_hu`` ``(1, H, W)`` the phantom, ``labels`` ``(H, W)`` tissue labels of
    the phantom, ``protocol`` (index into :attr:`protocols`), ``phantom`` (index), ``name`` (str).

    Args:
        phantoms: phantoms in the split.
        size: slice side (64 by default: CPU scale).
        seed: phantom seed (see :data:`SPLIT_SEEDS`).
        protocols: source protocols (``None``: :data:`TRAIN_PROTOCOLS` and :data:`STANDARD` itself, the
            identity pair, so a standard scan maps to itself).
        standard: the target protocol.
        real: put the real slice (``CT_small.dcm``) first among the phantoms.
        cache_dir: folder for reconstructed slices (``None``: memory only).
    """

    def __init__(self, phantoms: int = 32, size: int = 64, seed: int = 0, protocols: Sequence[Protocol] | None = None,
                 standard: Protocol = STANDARD, real: bool = False, cache_dir: str | Path | None = None) -> None:
        if phantoms < 1:
            raise ValueError(f"phantoms must be at least 1, got {phantoms}")
        self.n_phantoms, self.size, self.seed, self.real = phantoms, size, seed, real
        self.protocols = list(protocols if protocols is not None else (*TRAIN_PROTOCOLS, STANDARD))
        self.standard = standard
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._memory: dict[tuple[int, str], np.ndarray] = {}

    @classmethod
    def split(cls, name: Literal["train", "val", "test"], phantoms: int = 32, size: int = 64,
              cache_dir: str | Path | None = None) -> SimulatedScanners:
        """A split: training protocols for train / val; for test, the real slice and the held-out protocol too."""
        if name not in SPLIT_SEEDS:
            raise KeyError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_SEEDS)}")
        test = name == "test"
        protocols = (*TRAIN_PROTOCOLS, HELD_OUT_PROTOCOL) if test else None
        return cls(phantoms, size, SPLIT_SEEDS[name], protocols, real=test, cache_dir=cache_dir)

    def __len__(self) -> int:
        return self.n_phantoms * len(self.protocols)

    def kind(self, phantom: int) -> str:
        """The phantom kind of a phantom index."""
        if self.real and phantom == 0:
            return "real"
        return _PHANTOM_KINDS[phantom % len(_PHANTOM_KINDS)]

    def phantom(self, phantom: int) -> np.ndarray:
        """The clean phantom (HU)."""
        return make_phantom(self.kind(phantom), self.size, self.seed, phantom)

    def _key(self, phantom: int, protocol: Protocol) -> str:
        spec = repr((self.kind(phantom), self.size, self.seed, phantom, asdict(protocol), "ct-sim-v1"))
        return hashlib.sha256(spec.encode()).hexdigest()[:20]

    def scan(self, phantom: int, protocol: Protocol) -> np.ndarray:
        """The reconstruction of a phantom under a protocol (cached)."""
        key = self._key(phantom, protocol)
        if key in self._memory:
            return self._memory[key]
        path = None if self.cache_dir is None else self.cache_dir / f"{key}.npy"
        if path is not None and path.exists():
            rec = np.load(path, allow_pickle=False)
        else:
            rng = _rng("noise", self.seed, phantom, self.size, asdict(protocol))
            rec = simulate_scan(self.phantom(phantom), protocol, rng)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                np.save(buf, rec, allow_pickle=False)
                atomic_write(path, buf.getvalue())
        self._memory[key] = rec
        return rec

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        phantom, p = divmod(i, len(self.protocols))
        protocol = self.protocols[p]
        clean = self.phantom(phantom)
        src, tgt = self.scan(phantom, protocol), self.scan(phantom, self.standard)
        src_t, tgt_t = torch.from_numpy(src)[None], torch.from_numpy(tgt)[None]
        return {"source": normalize_hu(src_t), "target": normalize_hu(tgt_t), "source_hu": src_t, "target_hu": tgt_t,
                "clean_hu": torch.from_numpy(clean)[None], "labels": torch.from_numpy(tissue_labels(clean)),
                "protocol": p, "phantom": phantom,
                "name": f"ct-{self.seed}-{phantom:04d}-{self.kind(phantom)}-{protocol.name}"}


class CTDataModule(L.LightningDataModule):
    """Paired simulated-scanner batches (:class:`SimulatedScanners`) for the CT standardization models.

    Args:
        size: slice side (64: CPU scale).
        batch_size: batch size.
        phantoms: phantoms per split (train, val, test).
        num_workers: loader workers.
        cache_dir: on-disk cache of reconstructions (``None``: memory only).
    """

    def __init__(self, size: int = 64, batch_size: int = 8, phantoms: Sequence[int] = (64, 8, 16),
                 num_workers: int = 0, cache_dir: str | None = None) -> None:
        super().__init__()
        if len(phantoms) != 3:
            raise ValueError(f"phantoms holds the train, val and test phantom counts, got {phantoms}")
        self.size, self.batch_size, self.phantoms = size, batch_size, tuple(phantoms)
        self.num_workers, self.cache_dir = num_workers, cache_dir
        self._sets: dict[str, SimulatedScanners] = {}

    def dataset(self, stage: Literal["train", "val", "test"]) -> SimulatedScanners:
        """The split's dataset (built once, so its reconstruction cache is kept)."""
        if stage not in self._sets:
            n = self.phantoms[("train", "val", "test").index(stage)]
            self._sets[stage] = SimulatedScanners.split(stage, n, self.size, self.cache_dir)
        return self._sets[stage]

    def _loader(self, stage: Literal["train", "val", "test"], shuffle: bool) -> DataLoader:
        data = self.dataset(stage)
        return DataLoader(data, self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle and len(data) >= self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training pairs."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation pairs (other phantoms, training protocols)."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Test pairs (held-out phantoms incl. the real slice; training protocols and the held-out one)."""
        return self._loader("test", False)
