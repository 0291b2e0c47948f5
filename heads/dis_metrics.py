"""The DIS benchmark's metric suite, computed by PySODMetrics and accumulated as a torchmetrics ``Metric``.

DIS5K (Qin et al., "Highly Accurate Dichotomous Image Segmentation", ECCV 2022) reports, per test set,
the maximal / mean / adaptive F-measure, the weighted F-measure, MAE, the S-measure, the E-measure and
the human correction effort (HCE). :class:`DISMetrics` computes each of them with the field's reference
implementation, PySODMetrics (``py_sod_metrics``), image by image, exactly as a PySODMetrics evaluation
loop over saved prediction PNGs does, and averages over the dataset at :meth:`DISMetrics.compute`.

How the reference accumulates (and so how this metric does): every evaluator keeps one value per image
(one 256-value curve per image for the threshold-swept F- and E-measures) and its ``get_results`` takes
the plain mean over images (``np.mean(..., axis=0)`` in float64); "max" and "mean" of a curve are the
max / mean over thresholds of that *dataset-mean* curve (not a mean of per-image maxima). The state here
is those per-image values and curves, as list states with ``dist_reduce_fx="cat"``: under DDP (or
:meth:`~torchmetrics.Metric.merge_state`) the gathered lists are exactly the per-image values of one
pass over the whole dataset, so the result is that of one pass (the order of images changes only the
floating-point summation order of the final means, ~1e-16). A mean of per-batch scores, which would
weight images by batch, is never formed.

Conventions of the reference, reproduced by feeding it what it reads from disk:

* Predictions are 8-bit grey images. A floating prediction in ``[0, 1]`` is first quantised as a
  prediction PNG is written: ``uint8(255 · p)``, truncating (what torchvision's ``to_pil_image`` and
  the DIS IS-Net inference script do; computed in ``float32`` for half-precision inputs, in the input's
  dtype otherwise). A ``uint8`` prediction is taken as the PNG's bytes, unchanged.
* The reference then maps the 8-bit prediction to ``p / 255`` and min-max normalises it per image
  (MATLAB's ``mapminmax(im2double(·))``; a constant map is left as it is).
* Ground truth is binary. The reference reads an 8-bit mask and keeps ``gt > 128``; this metric takes the
  already-binary mask (bool, or 0 / 1 values) and hands the reference ``255 · gt``. Threshold 8-bit mask
  files with ``> 128`` before passing them to reproduce the benchmark.
* Prediction and ground truth must have the same size: the benchmark scores at the ground truth's
  resolution (resize the prediction to the original image size before :meth:`DISMetrics.update`).

The metrics (names of :meth:`DISMetrics.compute`'s keys):

* ``mae`` — mean absolute error ``mean|p - g|`` of the normalised prediction (Perazzi et al. 2012).
* ``fm_max``, ``fm_mean``, ``fm_adp`` — F-measure ``(1 + β²) P R / (β² P + R)`` with ``β² = 0.3``
  (Achanta et al. 2009), PySODMetrics' ``FmeasureV2`` + ``FmeasureHandler``: the prediction binarised at
  each of the 256 thresholds ``≥ 255, ≥ 254, …, ≥ 0`` of its 8-bit re-quantisation; max and mean over
  thresholds of the dataset-mean curve; adaptive: binarised at ``min(2 · mean(p), 1)`` per image.
* ``wfm`` — weighted F-measure of Margolin et al. (2014), ``WeightedFmeasure`` with the reference's
  ``β² = 1``: errors spread to the nearest foreground pixel, smoothed by a 7×7 Gaussian (σ = 5) and
  weighted by distance to the foreground; an image with empty ground truth scores 0.
* ``sm`` — S-measure of Fan et al. (2017), ``α = 0.5`` between object- and region-aware structural
  similarity; empty ground truth scores ``1 - mean(p)``, full ground truth ``mean(p)``.
* ``em_adp``, ``em_mean``, ``em_max`` — E-measure (enhanced alignment) of Fan et al. (2018): adaptive
  threshold ``min(2 · mean(p), 1)``; mean and max over the 256 thresholds of the dataset-mean curve.
* ``hce`` — human correction effort of Qin et al. (2022), ``HumanCorrectionEffortMeasure`` with
  ``relax=5``, ``epsilon=2.0``: the number of polygon control points (Ramer-Douglas-Peucker) plus
  independent regions needed to fix the false positives and false negatives of ``p > 0.5``, after
  relaxing thin errors by 5 erosions / dilations and keeping the ground truth's skeleton (scikit-image
  ``skeletonize``) as structure a false negative must restore. Lower is better; the reference's is
  scored at the original resolution.

PySODMetrics pins ``numpy<2.3.5`` and ``scikit-image<0.26`` (``skeletonize`` and friends feed HCE); the
project's dependencies state the same pins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import py_sod_metrics as sod
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["DIS_METRIC_NAMES", "DISMetrics", "dis_image_scores", "to_reference_images"]

#: keys of :meth:`DISMetrics.compute`, in the order DIS papers report them
DIS_METRIC_NAMES = ("fm_max", "fm_mean", "fm_adp", "wfm", "mae", "sm", "em_adp", "em_mean", "em_max", "hce")

#: number of thresholds of the reference's F- and E-measure curves
NUM_THRESHOLDS = 256

# per-image state name -> whether it is a 256-threshold curve
_STATES = {"mae": False, "fm_curve": True, "fm_adp": False, "wfm": False, "sm": False,
           "em_curve": True, "em_adp": False, "hce": False}

TensorOrImages = torch.Tensor | Sequence[torch.Tensor]


def _as_images(x: TensorOrImages, what: str) -> list[torch.Tensor]:
    """Splits a batch ``(B, H, W)`` / ``(B, 1, H, W)`` or a sequence of ``(H, W)`` / ``(1, H, W)`` images."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 4:
            if x.shape[1] != 1:
                raise ValueError(f"{what} must be (B, H, W) or (B, 1, H, W); got {tuple(x.shape)} "
                                 f"({x.shape[1]} channels)")
            x = x[:, 0]
        if x.ndim != 3:
            raise ValueError(f"{what} must be (B, H, W) or (B, 1, H, W); got {tuple(x.shape)}")
        return list(x.unbind(0))
    images = []
    for i, image in enumerate(x):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a tensor, got {type(image).__name__}")
        if image.ndim == 3 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 2:
            raise ValueError(f"{what}[{i}] must be (H, W) or (1, H, W); got {tuple(image.shape)}")
        images.append(image)
    return images


def _prediction_uint8(pred: torch.Tensor, index: int) -> np.ndarray:
    """One prediction as the 8-bit image the reference reads (see the module docstring)."""
    if pred.dtype == torch.uint8:
        return pred.detach().cpu().numpy()
    if not pred.is_floating_point():
        raise TypeError(f"prediction {index} must be float probabilities in [0, 1] or uint8 in [0, 255]; "
                        f"got dtype {pred.dtype}")
    pred = pred.detach()
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    if pred.numel() and not (bool(torch.isfinite(pred).all()) and float(pred.min()) >= 0 and float(pred.max()) <= 1):
        bad = pred[~(torch.isfinite(pred) & (pred >= 0) & (pred <= 1))]
        raise ValueError(f"prediction {index} must hold probabilities in [0, 1]; found {bad.numel()} values "
                         f"outside (e.g. {float(bad.flatten()[0])}); pass uint8 for 0-255 images")
    return (pred * 255).to(torch.uint8).cpu().numpy()  # truncation, as a PNG writer given 255 p


def _target_uint8(target: torch.Tensor, index: int) -> np.ndarray:
    """One binary ground truth as the 0 / 255 mask the reference reads."""
    target = target.detach()
    if target.dtype != torch.bool:
        if target.is_complex():
            raise TypeError(f"ground truth {index} must be binary (bool or 0/1 values); got dtype {target.dtype}")
        nonbinary = (target != 0) & (target != 1)
        if bool(nonbinary.any()):
            values = torch.unique(target[nonbinary])[:5].tolist()
            raise ValueError(f"ground truth {index} must be binary (bool or 0/1 values); found {int(nonbinary.sum())} "
                             f"other values, e.g. {values} (threshold 8-bit masks with > 128 first)")
        target = target == 1
    return target.cpu().numpy().astype(np.uint8) * 255


def to_reference_images(preds: TensorOrImages, target: TensorOrImages) -> list[tuple[np.ndarray, np.ndarray]]:
    """Checked pairs of ``(prediction, ground truth)`` 8-bit images, as PySODMetrics reads them from PNGs.

    Args:
        preds: predictions, ``(B, H, W)`` / ``(B, 1, H, W)`` or a sequence of ``(H, W)`` / ``(1, H, W)``:
            float probabilities in ``[0, 1]`` (quantised to ``uint8(255 p)``, truncating) or ``uint8``.
        target: binary ground truth of the same shapes (bool, or 0 / 1 values of any real dtype).

    Returns:
        One ``(pred uint8 (H, W), gt uint8 (H, W) in {0, 255})`` pair per image.

    Raises:
        ValueError: layouts or sizes differ, a prediction is outside ``[0, 1]`` (or not finite), or the
            ground truth is not binary.
        TypeError: a prediction is neither floating nor ``uint8``.
    """
    pred_images, target_images = _as_images(preds, "predictions"), _as_images(target, "ground truth")
    if len(pred_images) != len(target_images):
        raise ValueError(f"{len(pred_images)} predictions but {len(target_images)} ground-truth masks")
    pairs = []
    for i, (p, t) in enumerate(zip(pred_images, target_images, strict=True)):
        if p.shape != t.shape:
            raise ValueError(f"image {i}: prediction {tuple(p.shape)} and ground truth {tuple(t.shape)} differ in "
                             f"size (resize the prediction to the ground truth's resolution)")
        if p.numel() == 0:
            raise ValueError(f"image {i} is empty ({tuple(p.shape)})")
        pairs.append((_prediction_uint8(p, i), _target_uint8(t, i)))
    return pairs


def dis_image_scores(pred: np.ndarray, gt: np.ndarray, with_hce: bool = True) -> dict[str, np.ndarray]:
    """The reference's per-image quantities for one 8-bit image pair.

    Each quantity is what one PySODMetrics evaluator, having stepped over this image alone, returns from
    ``get_results`` (the mean over one image is that image's value), so only the public API is used.

    Args:
        pred: 8-bit prediction ``(H, W)``.
        gt: 8-bit ground truth ``(H, W)`` (the reference keeps ``gt > 128``).
        with_hce: compute HCE (the slowest metric); ``NaN`` when off.

    Returns:
        ``{"mae", "fm_adp", "wfm", "sm", "em_adp", "hce"}`` as float64 scalars and ``{"fm_curve",
        "em_curve"}`` as float64 ``(256,)`` curves over thresholds ``≥ 255 … ≥ 0``.
    """
    mae, wfm, sm, em = sod.MAE(), sod.WeightedFmeasure(), sod.Smeasure(alpha=0.5), sod.Emeasure()
    fm = sod.FmeasureV2({"fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3)})
    evaluators = [mae, wfm, sm, em, fm]
    if with_hce:
        hce = sod.HumanCorrectionEffortMeasure(relax=5, epsilon=2.0)
        evaluators.append(hce)
    for evaluator in evaluators:
        evaluator.step(pred, gt)
    fm_results, em_results = fm.get_results()["fm"], em.get_results()["em"]
    scores = {
        "mae": mae.get_results()["mae"],
        "fm_curve": fm_results["dynamic"],
        "fm_adp": fm_results["adaptive"],
        "wfm": wfm.get_results()["wfm"],
        "sm": sm.get_results()["sm"],
        "em_curve": em_results["curve"],
        "em_adp": em_results["adp"],
        "hce": hce.get_results()["hce"] if with_hce else np.nan,
    }
    return {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}


class DISMetrics(Metric):
    """The DIS benchmark's metrics over a dataset, image by image with PySODMetrics (see the module docstring).

    ``update(preds, target)`` takes a batch (``(B, H, W)`` or ``(B, 1, H, W)``; float probabilities in
    ``[0, 1]`` or ``uint8``, binary ground truth) or a sequence of images of different sizes; sizes may
    change from call to call. ``compute()`` returns the dataset scores keyed by :data:`DIS_METRIC_NAMES`.
    The per-image values are computed on the CPU (the reference is NumPy / OpenCV) and kept as float64
    list states, gathered by concatenation across processes (a process that saw no image is allowed).

    Cost: about 1.1 s per 1024×1024 image on one CPU core (HCE 0.8 s, weighted F 0.35 s, the rest 0.2 s);
    ``with_hce=False`` suits per-epoch validation, the full suite the final test. In a LightningModule:
    ``metric.update(p, g)`` in each step, ``self.log_dict(metric.compute())`` and ``metric.reset()`` at the
    epoch's end.

    Args:
        with_hce: also compute HCE, the slowest metric (off: ``hce`` is left out of ``compute``'s result).
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None  # mixed: HCE and MAE are lower-is-better, the rest higher-is-better

    def __init__(self, with_hce: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.with_hce = with_hce
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # Every state is a list of flat float64 tensors (a curve is stored flat, 256 values per image): a
        # process that saw no image then syncs torchmetrics' empty stand-in ``tensor([], dtype=self.dtype)``,
        # which gathers with the others only if it has their dtype and number of dimensions.
        self.set_dtype(torch.float64)

    def update(self, preds: TensorOrImages, target: TensorOrImages) -> None:
        """Adds the per-image quantities of a batch.

        Args:
            preds: predictions (see :func:`to_reference_images`).
            target: binary ground truth of the same shapes.

        Raises:
            ValueError: shapes differ, predictions are outside ``[0, 1]``, or the ground truth is not binary.
            TypeError: a prediction is neither floating nor ``uint8``.
        """
        pairs = to_reference_images(preds, target)  # checks every image before any state changes
        for pred, gt in pairs:
            scores = dis_image_scores(pred, gt, with_hce=self.with_hce)
            for name, curve in _STATES.items():
                value = torch.as_tensor(scores[name], dtype=self.dtype, device=self.device)
                getattr(self, name).append(value.reshape(NUM_THRESHOLDS if curve else 1))

    def _gathered(self, name: str) -> np.ndarray:
        state = getattr(self, name)
        flat = dim_zero_cat(state).cpu().numpy() if not isinstance(state, list) or state else np.zeros(0)
        return flat.reshape(-1, NUM_THRESHOLDS) if _STATES[name] else flat

    @property
    def num_images(self) -> int:
        """Number of images added since the last reset (on this process, before synchronisation)."""
        state = self.mae
        return len(state) if isinstance(state, list) else int(state.numel())

    def compute(self) -> dict[str, torch.Tensor]:
        """The dataset scores: means over images of the per-image values, max / mean of mean curves.

        Returns:
            float64 scalars keyed by :data:`DIS_METRIC_NAMES` (``hce`` only with ``with_hce``).

        Raises:
            RuntimeError: no image was added.
        """
        values = {name: self._gathered(name) for name in _STATES}
        if values["mae"].shape[0] == 0:
            raise RuntimeError("DISMetrics.compute() called before any image was added")
        fm_curve, em_curve = values["fm_curve"].mean(axis=0), values["em_curve"].mean(axis=0)
        scores = {
            "fm_max": fm_curve.max(), "fm_mean": fm_curve.mean(), "fm_adp": values["fm_adp"].mean(),
            "wfm": values["wfm"].mean(), "mae": values["mae"].mean(), "sm": values["sm"].mean(),
            "em_adp": values["em_adp"].mean(), "em_mean": em_curve.mean(), "em_max": em_curve.max(),
        }
        if self.with_hce:
            scores["hce"] = values["hce"].mean()
        return {name: torch.tensor(float(scores[name]), dtype=torch.float64, device=self.device)
                for name in DIS_METRIC_NAMES if name in scores}
