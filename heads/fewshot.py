"""Few-shot semantic segmentation: what every method shares.

The methods live one per file (:mod:`heads.fewshot_prototype`, :mod:`heads.fewshot_diffews`); this
file holds the episodic metric of the HSNet protocol, the episode utilities (input checks, k-shot by
native pass or per-shot vote, per-pixel features with a per-image cache) and :class:`FewShotModule`,
the LightningModule base that evaluates any method on episodes.

Metric (exact protocol): over all episodes, foreground intersection and union are *summed per class*;
``mIoU`` is the mean over the classes seen of ``ΣI_c / ΣU_c`` (not a mean of per-episode IoUs), and
``FB-IoU`` is ``½ (ΣI_fg / ΣU_fg + ΣI_bg / ΣU_bg)`` summed over all episodes. Ignored pixels (PASCAL's
255 boundary) count in neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric

from difffeat.data.episodes import check_evaluation_batch
from difffeat.extract import FeatureExtractor
from difffeat.noise import content_keys
from difffeat.readout import PerPixel, concat_features

__all__ = ["FeatureCache", "FewShotIoU", "FewShotModule", "Predictor", "check_episode", "check_episodes",
           "dense_features", "episode_masks", "shot_vote"]

#: a batched few-shot predictor: support ``(E, k, C, H, W)``, support masks ``(E, k, H, W)``, queries
#: ``(E, C, H, W)`` → binary query masks ``(E, H, W)``
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FewShotIoU(Metric):
    """mIoU and FB-IoU of binary episode predictions, summed per class over episodes.

    Args:
        num_classes: size of the class-id space (ids ``0 … num_classes-1``).
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        for name in ("intersection", "union"):
            self.add_state(name, torch.zeros(2, num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_ids: torch.Tensor,
               ignore: torch.Tensor | None = None) -> None:
        """Adds a batch of episodes.

        Ignored pixels are removed from both prediction and ground truth before counting, as in HSNet's
        evaluator (which sets them to 255 in both, outside its two-bin histograms): they count in neither
        the foreground nor the background intersection and union.

        Args:
            pred: predicted query masks ``(B, H, W)`` (bool).
            target: ground-truth query masks ``(B, H, W)`` (bool).
            class_ids: the episodes' class ids ``(B,)``.
            ignore: pixels to leave out ``(B, H, W)`` (e.g. PASCAL's 255 boundary), or ``None``.

        Raises:
            ValueError: shapes differ, or an ignored pixel is marked foreground in ``target``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.bool(), target.bool()
        if ignore is None:
            valid = torch.ones_like(target)
        else:
            if ignore.shape != target.shape:
                raise ValueError(f"ignore mask {tuple(ignore.shape)} and target {tuple(target.shape)} differ in shape")
            ignore = ignore.bool().to(target.device)
            if (ignore & target).any():  # HSNet asserts the same: a pixel is either labelled or ignored
                raise ValueError(f"{int((ignore & target).sum())} ignored pixels are foreground in the target")
            valid = ~ignore
        class_ids = torch.as_tensor(class_ids, device=pred.device).long().flatten()
        for fg, (p, t) in enumerate(((~pred, ~target), (pred, target))):
            inter = (p & t & valid).flatten(1).sum(1).double()
            union = ((p | t) & valid).flatten(1).sum(1).double()
            self.intersection[fg].index_add_(0, class_ids, inter)
            self.union[fg].index_add_(0, class_ids, union)
        self.episodes.index_add_(0, class_ids, torch.ones_like(class_ids))

    def compute(self) -> dict[str, torch.Tensor]:
        """The protocol's scores over every episode added since the last reset.

        Returns:
            ``{"miou": …, "fbiou": …}`` (fractions, float64 scalars).
        """
        seen = self.episodes > 0
        iou = self.intersection[1, seen] / self.union[1, seen].clamp(min=1)
        fb = self.intersection[:, seen].sum(1) / self.union[:, seen].sum(1).clamp(min=1)
        return {"miou": iou.mean(), "fbiou": fb.mean()}


def dense_features(extractor: FeatureExtractor) -> Callable[..., torch.Tensor]:
    """Per-pixel features of images from a per-pixel extractor.

    A grey-scale backbone (one input channel, like the digits U-Net) is given the images' luminance.

    Args:
        extractor: an extractor with a ``PerPixel`` readout and ``output_fmt="NCHW"``.

    Returns:
        ``(images, indices=None)`` → ``(N, C, h, w)``: every tap upsampled to one size and concatenated
        (``indices`` seed each image's noise, see :meth:`FeatureExtractor.forward`).

    Raises:
        TypeError: the readout is not per-pixel NCHW.
    """
    if not isinstance(extractor.readout, PerPixel) or extractor.readout.output_fmt != "NCHW":
        raise TypeError("dense features need a PerPixel readout with output_fmt='NCHW'")
    grey = extractor.backbone.image_channels == 1

    def run(images: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
        if grey and images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        return concat_features(extractor(images, indices))

    return run


class FeatureCache:
    """Remembers the features of every image seen, keyed by the image's content.

    Episodes reuse images (a scene is the query of one episode and the support of others), so an
    evaluation over many episodes computes each image's features once. ``features`` must give an image
    the same features whatever batch it is in and wherever it sits in the data: an extractor with the
    ``"content"`` noise rule of :mod:`difffeat.noise` (``FeatureExtractor(..., noise="content")``).

    Args:
        features: ``images`` → ``(N, C, h, w)`` (e.g. :func:`dense_features` of such an extractor).
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.features = features
        self.store: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.store)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(N, C, h, w)`` of ``images`` ``(N, C, H, W)``, computing only the unseen ones."""
        keys = content_keys(images)
        missing = {k: i for i, k in enumerate(keys) if k not in self.store}  # dict: an image twice is computed once
        if missing:
            for k, f in zip(missing, self.features(images[list(missing.values())]), strict=True):
                self.store[k] = f
        return torch.stack([self.store[k] for k in keys])


def check_episode(support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                  allow_empty: bool = False) -> None:
    """Checks one episode's shapes and supports before any work is done on it.

    Args:
        support: ``(k, C, H, W)`` support images.
        support_mask: ``(k, H, W)`` support masks.
        query: ``(B, C, H', W')`` query images.
        allow_empty: accept empty support masks (the benchmark's empty-support control only).

    Raises:
        ValueError: no support, masks of another shape, an empty support mask (index named), or queries
            whose channels differ from the supports'.
    """
    if support.ndim != 4 or support.shape[0] == 0:
        raise ValueError(f"support must be (k >= 1, C, H, W), got {tuple(support.shape)}")
    if support_mask.shape != (support.shape[0], *support.shape[-2:]):
        k, _, h, w = support.shape
        raise ValueError(f"support masks {tuple(support_mask.shape)} do not match the support images "
                         f"{tuple(support.shape)}: expected ({k}, {h}, {w})")
    empty = [] if allow_empty else [i for i, m in enumerate(support_mask) if not m.any()]
    if empty:
        raise ValueError(f"support mask(s) {empty} are empty: a prototype needs foreground pixels")
    if query.ndim != 4 or query.shape[1] != support.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} must be (B, {support.shape[1]}, H, W) like the support")


def check_episodes(support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                   allow_empty: bool = False) -> None:
    """Checks a batch of episodes (:func:`check_episode` on each) before any work is done on it.

    Args:
        support: ``(E, k, C, H, W)`` support images.
        support_mask: ``(E, k, H, W)`` support masks.
        query: ``(E, C, H, W)`` query images.
        allow_empty: accept empty support masks (the benchmark's empty-support control only).

    Raises:
        ValueError: supports or masks not batched as ``(E, k, …)``, or any check of :func:`check_episode`.
    """
    if support.ndim != 5 or support_mask.shape != (*support.shape[:2], *support.shape[-2:]):
        raise ValueError(f"support {tuple(support.shape)} and masks {tuple(support_mask.shape)} must be "
                         f"(E, k, C, H, W) and (E, k, H, W)")
    for e in range(len(support)):
        check_episode(support[e], support_mask[e], query[e:e + 1], allow_empty)


def shot_vote(masks: torch.Tensor) -> torch.Tensor:
    """Per-shot vote for k-shot.

    Args:
        masks: per-shot binary masks ``(k, H, W)``.

    Returns:
        ``(H, W)`` bool: the per-pixel sum of the masks, divided by its maximum, at least 0.5.
    """
    total = masks.float().sum(0)
    return total / total.max().clamp(min=1) >= 0.5


def episode_masks(predict: Predictor, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                  vote: bool = False) -> torch.Tensor:
    """Binary query masks of a batch of k-shot episodes.

    Args:
        predict: the method's batched predictor (see :data:`Predictor`).
        support: ``(E, k, C, H, W)``.
        support_mask: ``(E, k, H, W)``.
        query: ``(E, C, H, W)``.
        vote: with ``k > 1``, k one-shot passes merged by :func:`shot_vote` instead of one native k-shot
            pass.

    Returns:
        ``(E, H, W)`` bool.
    """
    if not vote or support.shape[1] == 1:
        return predict(support, support_mask, query)
    per_shot = torch.stack([predict(support[:, i:i + 1], support_mask[:, i:i + 1], query)
                            for i in range(support.shape[1])], 1)
    return torch.stack([shot_vote(m) for m in per_shot])


class FewShotModule(L.LightningModule):
    """Episode evaluation shared by the few-shot methods' LightningModules.

    A subclass sets ``self.model``, an ``nn.Module`` whose ``predict`` is a :data:`Predictor`; this base
    scores it on validation and test episodes (batches of :class:`~difffeat.data.episodes.FewShotEpisodes`
    items) and logs ``{val,test}/miou`` and ``{val,test}/fbiou`` once per epoch.

    Args:
        num_classes: class-id space of the metric.
        vote: k-shot by per-shot vote (k one-shot predictions, :func:`shot_vote`) instead of one native
            k-shot pass.
        **kwargs: passed on to the next base (:class:`~heads.base.FrozenFeatureModule` for methods on
            frozen features).
    """

    model: nn.Module

    def __init__(self, num_classes: int = 20, vote: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # a frozen-feature method passes its feature source on
        self.vote = vote
        self.val_iou, self.test_iou = FewShotIoU(num_classes), FewShotIoU(num_classes)

    def predict_masks(self, batch: dict[str, Any]) -> torch.Tensor:
        """Binary query masks ``(E, H, W)`` of a batch of episodes."""
        return episode_masks(self.model.predict, batch["support"], batch["support_mask"], batch["query"], self.vote)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Adds the batch's episodes to the validation metric (a negative training episode is refused)."""
        check_evaluation_batch(batch)
        self.val_iou.update(self.predict_masks(batch), batch["query_mask"], batch["class_id"],
                            batch.get("query_ignore"))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Adds the batch's episodes to the test metric (a negative training episode is refused)."""
        check_evaluation_batch(batch)
        self.test_iou.update(self.predict_masks(batch), batch["query_mask"], batch["class_id"],
                             batch.get("query_ignore"))

    def on_validation_epoch_end(self) -> None:
        """Logs the epoch's validation scores."""
        self._log_scores(self.val_iou, "val")

    def on_test_epoch_end(self) -> None:
        """Logs the epoch's test scores."""
        self._log_scores(self.test_iou, "test")

    def _log_scores(self, metric: FewShotIoU, prefix: str) -> None:
        """Logs the protocol's scores (``miou``, ``fbiou``) once per epoch, then resets the metric.

        Intersections and unions are summed over *all* episodes first (a mean of per-batch scores would
        not be the protocol's mIoU).
        """
        scores = metric.compute()
        self.log_dict({f"{prefix}/miou": scores["miou"].float(), f"{prefix}/fbiou": scores["fbiou"].float()},
                      prog_bar=True)
        metric.reset()
