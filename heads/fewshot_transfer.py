"""Training-free few-shot segmentation by label transfer: k nearest support pixels in diffusion-feature space.

Each query position takes the mask vote of its ``k`` most cosine-similar support positions, pooled over
all shots: the dense-correspondence route diffusion features are known for (semantic correspondence,
label propagation). Unlike a prototype (:mod:`heads.fewshot_prototype`) it keeps every support pixel, so
a class whose parts look different (a ring's rim, a digit's strokes) is not averaged into one vector.
Nothing is trained: the LightningModule only evaluates (``difffeat test``), on the same frozen features
as the prototype baseline (a :class:`~heads.base.FrozenFeatureModule` with per-pixel, content-seeded
features).

Design choices:

* **Labels at the feature grid.** Support masks are brought to the feature resolution by area
  interpolation and a cell is foreground when at least half of it is (a majority label per support
  position, so a vote is a vote of binary labels). A support object so small that no cell is half
  covered would leave that shot without foreground: that is refused with the shot, the episode and the
  resolution named, rather than silently predicting background.
* **Several taps.** With ``tap_normalise`` each tap's channels are L2-normalised on their own before the
  cosine, which then is the mean of the per-tap cosines (a tap with large activations does not drown
  the others); with one tap it is the plain cosine.
* **Bounded memory.** The query × support similarity is computed in blocks of query rows, each at most
  ``block_elements`` similarities (default ``2**22``: 16 MiB in float32), and only the ``k`` best of each
  row are kept. A 64 × 64 query grid against 5 shots of 64 × 64 (20 480 support positions) would need a
  4096 × 20480 matrix (320 MiB) at once; in blocks it needs 204 rows × 20 480 at a time, plus the
  ``(4096, k)`` neighbours.
* **Ties** at the vote threshold (``k`` even, half the neighbours foreground) go to background: a pixel
  is foreground only when a strict majority of its neighbours are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.data.episodes import check_evaluation_batch
from difffeat.readout import PerPixel
from heads.base import FrozenFeatureModule
from heads.fewshot import FewShotModule, check_episode, dense_features, episode_masks

__all__ = ["LabelTransferFewShotModule", "LabelTransferSegmenter", "knn_vote", "normalise_taps",
           "support_labels"]

#: default bound on the similarities held at once (query rows × support positions)
BLOCK_ELEMENTS = 2**22


def normalise_taps(features: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
    """L2-normalises each group of channels on its own, so a cosine on the result is the mean of per-group cosines.

    Args:
        features: ``(N, C)`` (channels last).
        groups: channel widths of the taps, summing to ``C``; ``None``: one group.

    Returns:
        ``(N, C)``; each group has norm ``1 / sqrt(len(groups))``, so rows have unit norm.

    Raises:
        ValueError: the widths do not sum to ``C``.
    """
    groups = [features.shape[-1]] if groups is None else list(groups)
    if sum(groups) != features.shape[-1]:
        raise ValueError(f"tap widths {groups} sum to {sum(groups)}, but the features have {features.shape[-1]} "
                         f"channels")
    parts = [F.normalize(p, dim=-1) for p in features.split(groups, dim=-1)]
    return torch.cat(parts, -1) / len(groups) ** 0.5


def knn_vote(query: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, k: int,
             block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Fraction of foreground labels among each query row's ``k`` most cosine-similar support rows.

    Args:
        query: ``(Nq, C)`` query features.
        support: ``(Ns, C)`` support features (all shots' positions together).
        labels: ``(Ns,)`` bool support labels.
        k: neighbours per query row (``1 … Ns``).
        block_elements: at most this many similarities are held at once (rows per block:
            ``max(1, block_elements // Ns)``).

    Returns:
        ``(Nq,)`` float in ``[0, 1]``.

    Raises:
        ValueError: ``k`` outside ``1 … Ns``, or labels that do not match the support rows.
    """
    if labels.shape != (support.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} do not match the {support.shape[0]} support rows")
    if not 1 <= k <= support.shape[0]:
        raise ValueError(f"k={k} neighbours, but the support has {support.shape[0]} positions")
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements}")
    q, s = F.normalize(query.float(), dim=-1), F.normalize(support.float(), dim=-1)
    fg = labels.float()
    rows = max(1, block_elements // s.shape[0])
    votes = [fg[(block @ s.T).topk(k, dim=1).indices].mean(1) for block in q.split(rows)]
    return torch.cat(votes) if votes else q.new_zeros(0)


def support_labels(masks: torch.Tensor, size: tuple[int, int], episode: Any = None) -> torch.Tensor:
    """Binary support labels at the feature grid: a cell is foreground when at least half of it is.

    Args:
        masks: ``(k, H, W)`` bool support masks.
        size: the feature grid ``(h, w)``.
        episode: the episode's number, for the error message.

    Returns:
        ``(k, h, w)`` bool.

    Raises:
        ValueError: a shot whose mask covers no cell by half (shot, episode, resolution and its pixel
            count named).
    """
    labels = F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0] >= 0.5
    empty = [i for i, m in enumerate(labels) if not m.any()]
    if empty:
        where = f"episode {episode}: " if episode is not None else ""
        counts = ", ".join(f"shot {i} ({int(masks[i].sum())} px)" for i in empty)
        raise ValueError(f"{where}support mask(s) of {counts} are empty at the {size[0]}x{size[1]} feature "
                         f"resolution: no feature cell is at least half foreground, so those shots have no "
                         f"foreground position to vote with; use larger features (feature_size) or larger objects")
    return labels


def _stack_shots(support: torch.Tensor | Sequence[torch.Tensor], masks: torch.Tensor | Sequence[torch.Tensor],
                 episode: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shots given as tensors or as lists of ``(C, H, W)`` / ``(H, W)``, stacked; mixed sizes refused by name."""
    if isinstance(support, torch.Tensor) and isinstance(masks, torch.Tensor):
        return support, masks
    sizes = [tuple(x.shape[-2:]) for x in support] + [tuple(m.shape[-2:]) for m in masks]
    if len(set(sizes)) > 1:
        where = f"episode {episode}: " if episode is not None else ""
        raise ValueError(f"{where}shots of mixed sizes: images {sizes[:len(support)]}, masks "
                         f"{sizes[len(support):]}; resize every shot to one size")
    return torch.stack(list(support)), torch.stack(list(masks))


class LabelTransferSegmenter(nn.Module):
    """Training-free label transfer: each query position takes the vote of its k nearest support positions.

    Args:
        features: images ``(N, 3, H, W)`` → feature maps ``(N, C, h, w)`` (e.g.
            :func:`~heads.fewshot.dense_features`, or a :class:`~heads.fewshot.FeatureCache` of it).
        k: neighbours per query position, over all shots together.
        groups: channel widths of the concatenated taps, each normalised on its own
            (:func:`normalise_taps`); ``None``: one cosine over all channels.
        block_elements: bound on the similarities held at once (see :func:`knn_vote`).
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], k: int = 10,
                 groups: Sequence[int] | None = None, block_elements: int = BLOCK_ELEMENTS) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.features, self.k, self.block_elements = features, k, block_elements
        self.groups = None if groups is None else list(groups)

    def forward(self, support: torch.Tensor | Sequence[torch.Tensor],
                support_mask: torch.Tensor | Sequence[torch.Tensor], query: torch.Tensor,
                episode: Any = None) -> torch.Tensor:
        """Foreground vote of every query pixel for one episode.

        Args:
            support: ``(k, C, H, W)`` support images (or a list of ``(C, H, W)`` of one size).
            support_mask: ``(k, H, W)`` bool support masks (or a list).
            query: ``(B, C, H', W')`` query images.
            episode: the episode's number, named in errors.

        Returns:
            ``(B, H', W')`` fraction of foreground neighbours, upsampled bilinearly to the query.

        Raises:
            ValueError: shots of mixed sizes, the checks of :func:`~heads.fewshot.check_episode`, all before
                any feature is computed; a support mask empty at the feature grid (:func:`support_labels`);
                more neighbours than support positions.
        """
        support, support_mask = _stack_shots(support, support_mask, episode)
        check_episode(support, support_mask, query)
        if support.shape[-2:] == query.shape[-2:]:
            feats = self.features(torch.cat([support, query]))
            fs, fq = feats[: len(support)], feats[len(support):]
        else:
            fs, fq = self.features(support), self.features(query)
        labels = support_labels(support_mask, tuple(fs.shape[-2:]), episode)
        s = normalise_taps(fs.permute(0, 2, 3, 1).flatten(0, 2), self.groups)
        q = normalise_taps(fq.permute(0, 2, 3, 1).flatten(0, 2), self.groups)
        if self.k > len(s):
            raise ValueError(f"k={self.k} neighbours, but the {len(support)} shot(s) have {len(s)} positions at "
                             f"{fs.shape[-2]}x{fs.shape[-1]}")
        votes = knn_vote(q, s, labels.flatten(), self.k, self.block_elements).view(len(query), 1, *fq.shape[-2:])
        return F.interpolate(votes, size=query.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def predict(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                episodes: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Binary query masks of a batch of episodes (a :data:`~heads.fewshot.Predictor`).

        Args:
            support: ``(E, k, C, H, W)``.
            support_mask: ``(E, k, H, W)``.
            query: ``(E, C, H, W)``.
            episodes: the episodes' numbers, named in errors.

        Returns:
            ``(E, H, W)`` bool: foreground where a strict majority of the neighbours are.
        """
        ids = [None] * len(query) if episodes is None else torch.as_tensor(episodes).tolist()
        return torch.stack([self(support[e], support_mask[e], query[e:e + 1], ids[e])[0] > 0.5
                            for e in range(len(query))])


class LabelTransferFewShotModule(FewShotModule, FrozenFeatureModule):
    """Evaluates label transfer on episodes (``difffeat test``); it has no trainable parameter.

    A :class:`~heads.base.FrozenFeatureModule` on online per-pixel features with noise seeded by image
    content, built exactly as :class:`~heads.fewshot_prototype.PrototypeFewShotModule` builds its own, so
    the two baselines compare on the same features. Evaluation batches are checked for negative
    episodes (:func:`~difffeat.data.episodes.check_evaluation_batch`).

    Args:
        backbone: backbone name or folder (any backbone whose taps give maps).
        layers: taps (concatenated; each normalised on its own with ``tap_normalise``).
        timesteps: timesteps of the features.
        feature_size: side of the per-pixel features (the grid votes are taken on). 32 by default: on the
            64 px scenes at 16, 3-11 of a fold's 300 five-shot test episodes hold a shot with no cell
            half covered (refused, see :func:`support_labels`); at 32, none of the 4 × 300.
        k: neighbours per query position, over all shots.
        tap_normalise: normalise each (tap, timestep) feature on its own before the cosine.
        block_elements: bound on the similarities held at once.
        num_classes: class-id space of the metric.
        vote: k-shot by per-shot vote instead of one pool of all shots' positions.
    """

    def __init__(self, backbone: str = "sd-unet-scenes", layers: list[str] | None = None,
                 timesteps: list[int] | None = None, feature_size: int = 32, k: int = 10, tap_normalise: bool = True,
                 block_elements: int = BLOCK_ELEMENTS, num_classes: int = 20, vote: bool = False) -> None:
        super().__init__(num_classes, vote, backbone=backbone, layers=layers or ["up_blocks.1"],
                         timesteps=timesteps or [0], readout=PerPixel(feature_size), noise="content")
        self.save_hyperparameters()
        info = self.extractor.backbone.feature_info
        groups = [info[layer].channels for layer, _ in self.extractor.keys] if tap_normalise else None
        self.model = LabelTransferSegmenter(dense_features(self.extractor), k, groups, block_elements)

    def predict_masks(self, batch: dict[str, Any]) -> torch.Tensor:
        """Binary query masks ``(E, H, W)`` of a batch of evaluation episodes (negative ones refused)."""
        check_evaluation_batch(batch)
        episodes = batch.get("episode")

        def predict(support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
            return self.model.predict(support, support_mask, query, episodes)

        return episode_masks(predict, batch["support"], batch["support_mask"], batch["query"], self.vote)
