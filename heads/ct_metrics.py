"""Metrics of CT standardization: fidelity to the standard scan and concordance of radiomic features.

* **PSNR / SSIM** against the standard-protocol scan, by torchmetrics, on HU clipped to
  :data:`~difffeat.data.ct.HU_RANGE` ``(-1024, 1024)``: the data range is **2048 HU** (the models'
  normalisation range; values outside are clipped in both images first). SSIM: torchmetrics' default
  Gaussian window (11 px, σ 1.5), whole slice. Both per image, averaged over images.
* **Texture features** (:func:`texture_features`) per tissue region of interest, the regions being the
  phantom's tissue labels (:func:`~difffeat.data.ct.tissue_labels`) **eroded by** :data:`ROI_EROSION`
  (2) px so that partial-volume boundaries do not dominate (a region under :data:`MIN_ROI` pixels gives
  NaN features). Regions: ``lung`` and ``soft_tissue`` (:data:`REGIONS`).

  - grey-level co-occurrence matrix, scikit-image ``graycomatrix`` / ``graycoprops``: HU quantised with a
    **fixed bin width of 25 HU** (pyradiomics' default bin width) inside a per-region window
    (:data:`GLCM_WINDOWS`: lung -1000 … -400 HU → 24 levels, soft tissue -160 … 240 HU → 16 levels;
    values outside are clipped into the end bins); pixels outside the region get a reserved level 0 whose
    row and column are dropped before the properties, so only pairs inside the region count;
    **distances 1 and 2 px, angles 0°, 45°, 90°, 135°**, symmetric; each property (contrast,
    dissimilarity, homogeneity, energy, correlation, ASM) averaged over the 8 (distance, angle) matrices.
  - first-order statistics of the region's HU: mean, standard deviation, skewness, excess kurtosis (scipy).
* **Concordance** (:func:`concordance`): Lin's concordance correlation coefficient (torchmetrics'
  ``concordance_corrcoef``) of each feature between the scans under the non-standard protocols
  (no-op) or their standardized versions (a method), and the same phantoms' standard scans, pooled over
  every (phantom, protocol) pair of the evaluated set; pairs where a feature is NaN (no such region) are
  left out of that feature (fewer than 3 pairs: NaN).

:class:`CTStandardizationMetrics` accumulates per-image values as ``cat`` states (so DDP and one pass
agree) and computes the dataset-level numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage, stats
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.regression import concordance_corrcoef

from difffeat.data.ct import HU_RANGE, TISSUES

__all__ = ["DATA_RANGE_HU", "FEATURE_NAMES", "FIRST_ORDER", "GLCM_PROPS", "GLCM_WINDOWS", "REGIONS",
           "CTStandardizationMetrics", "concordance", "first_order", "glcm_features", "psnr_ssim",
           "texture_features"]

#: PSNR / SSIM data range in HU (the width of :data:`~difffeat.data.ct.HU_RANGE`)
DATA_RANGE_HU = float(HU_RANGE[1] - HU_RANGE[0])
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
FIRST_ORDER = ("mean", "std", "skewness", "kurtosis")
REGIONS = ("lung", "soft_tissue")
#: GLCM quantisation window (HU) per region; the bin width is :data:`GLCM_BIN_WIDTH`
GLCM_WINDOWS = {"lung": (-1000.0, -400.0), "soft_tissue": (-160.0, 240.0)}
GLCM_BIN_WIDTH = 25.0
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
ROI_EROSION = 2
MIN_ROI = 20
#: every feature, in the order of :func:`texture_features`' vector
FEATURE_NAMES = tuple(f"{r}.glcm.{p}" for r in REGIONS for p in GLCM_PROPS) + tuple(
    f"{r}.fo.{s}" for r in REGIONS for s in FIRST_ORDER)


def psnr_ssim(pred_hu: torch.Tensor, target_hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of ``(B, 1, H, W)`` HU images on the clipped 2048-HU range.

    Returns:
        ``(psnr, ssim)``, each ``(B,)`` float64.
    """
    if pred_hu.shape != target_hu.shape or pred_hu.ndim != 4 or pred_hu.shape[1] != 1:
        raise ValueError(f"psnr_ssim takes two (B, 1, H, W) HU tensors of one shape, got {tuple(pred_hu.shape)} "
                         f"and {tuple(target_hu.shape)}")
    p, t = pred_hu.double().clamp(*HU_RANGE), target_hu.double().clamp(*HU_RANGE)
    psnr = peak_signal_noise_ratio(p, t, data_range=HU_RANGE, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(p, t, data_range=HU_RANGE, reduction="none")
    return psnr.reshape(-1), ssim.reshape(-1)


def _roi(labels: np.ndarray, region: str) -> np.ndarray:
    mask = np.asarray(labels) == TISSUES.index(region)
    return ndimage.binary_erosion(mask, iterations=ROI_EROSION) if ROI_EROSION else mask


def glcm_features(hu: np.ndarray, roi: np.ndarray, hu_window: Sequence[float],
                  bin_width: float = GLCM_BIN_WIDTH) -> np.ndarray:
    """The six GLCM properties of the HU inside ``roi`` (see the module docstring), NaN for a small ROI.

    Args:
        hu: ``(H, W)`` HU.
        roi: ``(H, W)`` bool region.
        hu_window: ``(low, high)`` HU of the quantisation.
        bin_width: HU per grey level.

    Returns:
        ``(6,)`` float64 in :data:`GLCM_PROPS` order.
    """
    from skimage.feature import graycomatrix, graycoprops

    roi = np.asarray(roi, bool)
    if roi.sum() < MIN_ROI:
        return np.full(len(GLCM_PROPS), np.nan)
    lo, hi = hu_window
    levels = int(np.ceil((hi - lo) / bin_width))
    q = np.clip(np.floor((np.asarray(hu, np.float64) - lo) / bin_width), 0, levels - 1).astype(np.uint8) + 1
    q[~roi] = 0
    glcm = graycomatrix(q, list(GLCM_DISTANCES), list(GLCM_ANGLES), levels=levels + 1, symmetric=True)
    glcm = glcm[1:, 1:].astype(np.float64)  # pairs touching the outside level are dropped
    if glcm.sum(axis=(0, 1)).min() == 0:
        return np.full(len(GLCM_PROPS), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):  # correlation of a constant region is NaN
        return np.array([float(np.mean(graycoprops(glcm, p))) for p in GLCM_PROPS])


def first_order(hu: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Mean, standard deviation, skewness and excess kurtosis of the HU in ``roi`` (NaN for a small ROI)."""
    v = np.asarray(hu, np.float64)[np.asarray(roi, bool)]
    if v.size < MIN_ROI:
        return np.full(len(FIRST_ORDER), np.nan)
    return np.array([v.mean(), v.std(), stats.skew(v), stats.kurtosis(v)])


def texture_features(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every feature of :data:`FEATURE_NAMES` of one ``(H, W)`` HU slice with its ``(H, W)`` tissue labels."""
    hu, labels = np.asarray(hu), np.asarray(labels)
    if hu.shape != labels.shape or hu.ndim != 2:
        raise ValueError(f"texture_features takes (H, W) HU and labels of one shape, got {hu.shape} and "
                         f"{labels.shape}")
    rois = {r: _roi(labels, r) for r in REGIONS}
    glcm = [glcm_features(hu, rois[r], GLCM_WINDOWS[r]) for r in REGIONS]
    fo = [first_order(hu, rois[r]) for r in REGIONS]
    return np.concatenate(glcm + fo)


def concordance(values: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
                names: Sequence[str] = FEATURE_NAMES) -> dict[str, float]:
    """Per-feature concordance correlation coefficient between two ``(N, F)`` feature tables (rows paired).

    NaN pairs are left out per feature; fewer than 3 pairs left, or no variance at all, give NaN.
    """
    a, b = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != len(names):
        raise ValueError(f"concordance takes two (N, {len(names)}) tables of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    out = {}
    for j, name in enumerate(names):
        ok = torch.isfinite(a[:, j]) & torch.isfinite(b[:, j])
        x, y = a[ok, j], b[ok, j]
        if len(x) < 3 or (x.var() + y.var()) == 0:
            out[name] = float("nan")
            continue
        out[name] = float(concordance_corrcoef(x, y))
    return out


class CTStandardizationMetrics(Metric):
    """PSNR / SSIM to the standard scan and per-feature CCC (prediction vs standard), over a dataset.

    ``update(pred_hu, target_hu, labels)`` takes ``(B, 1, H, W)`` HU predictions and standard scans and
    ``(B, H, W)`` tissue labels; ``compute()`` returns ``psnr``, ``ssim`` (means over images), ``ccc/<feature>``
    for each of :data:`FEATURE_NAMES` and ``ccc_mean`` (mean over the features with a finite CCC).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("psnr", "ssim", "features", "reference"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, pred_hu: torch.Tensor, target_hu: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch (see the class docstring)."""
        psnr, ssim = psnr_ssim(pred_hu.detach().cpu(), target_hu.detach().cpu())
        lab = labels.detach().cpu().numpy()
        p, t = pred_hu.detach().cpu().double().numpy()[:, 0], target_hu.detach().cpu().double().numpy()[:, 0]
        feats = [texture_features(p[i], lab[i]) for i in range(len(p))]
        refs = [texture_features(t[i], lab[i]) for i in range(len(t))]
        self.psnr.append(psnr.to(self.device))
        self.ssim.append(ssim.to(self.device))
        self.features.append(torch.as_tensor(np.stack(feats), dtype=torch.float64, device=self.device))
        self.reference.append(torch.as_tensor(np.stack(refs), dtype=torch.float64, device=self.device))

    @staticmethod
    def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return torch.cat(state) if isinstance(state, list) else state

    def compute(self) -> dict[str, float]:
        """Dataset-level numbers (see the class docstring)."""
        psnr, ssim = self._cat(self.psnr), self._cat(self.ssim)
        ccc = concordance(self._cat(self.features).reshape(-1, len(FEATURE_NAMES)),
                          self._cat(self.reference).reshape(-1, len(FEATURE_NAMES)))
        finite = [v for v in ccc.values() if np.isfinite(v)]
        return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
                **{f"ccc/{k}": v for k, v in ccc.items()},
                "ccc_mean": float(np.mean(finite)) if finite else float("nan")}
