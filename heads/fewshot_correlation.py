"""HSNet-style few-shot segmentation: a learned head that sees only query–support feature correlations.

HSNet builds, for several layers of a frozen backbone, the 4-D cosine correlation between every query
position and every *foreground* support position, and learns to segment from those correlations alone:
its input holds no query feature, so it cannot segment without consulting the support. This head keeps
that property on frozen diffusion features, at CPU scale:

* **Correlations.** For each tap (its channels normalised on their own), the cosine between every query
  position and every support position of all shots, at one feature grid.
* **Squeezing the support axes.** HSNet reduces the support dimensions with centre-pivot 4-D
  convolutions; here they are reduced by fixed pooling instead, per query position and tap: the best and
  the mean of the ``top_k`` best cosines over the support *foreground*, and the best cosine over the
  support *background* (``3 × taps`` maps at the query's grid). Choice and reason: a 4-D convolution over a
  16×16×16×16 correlation per tap costs more per step than the whole DiffewS-style model on 2 CPU cores,
  and the foreground/background contrast is what its squeeze learns to read first.
* **Decoder.** A few 3×3 convolutions on those maps give the mask logits at the grid, upsampled
  bilinearly to the query (HSNet's decoder is likewise a small convolutional stack on squeezed
  correlations).

Support foreground at the grid: a cell counts as foreground when the support mask covers any of it (area
interpolation > 0), so a small object is never lost by downsampling and no mean divides by zero. A support
mask that is empty at the image's resolution is refused (it has no foreground to correlate with), except for
the benchmark's empty-support control (``allow_empty_support``), where the foreground statistics are the
lowest cosine, −1.

k-shot is native (one pass through the decoder): the statistics are taken per shot and averaged over the
shots. Pooling all shots' positions first would shift them (a best match over five supports is higher
than over one), away from what a head trained on one-shot episodes has seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.readout import PerPixel
from heads.base import FrozenFeatureModule
from heads.fewshot import FewShotModule, check_episodes, dense_features
from heads.fewshot_diffews import EpisodeTraining
from heads.fewshot_transfer import normalise_taps

__all__ = ["CorrelationFewShotModule", "CorrelationSegmenter", "correlation_maps"]


def correlation_maps(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor, groups: Sequence[int],
                     top_k: int = 5) -> torch.Tensor:
    """Per-tap statistics of the query–support cosine correlation, at the query's feature grid.

    Args:
        query: ``(E, C, h, w)`` query features.
        support: ``(E, k, C, h', w')`` support features.
        masks: ``(E, k, H, W)`` bool support masks (any resolution).
        groups: channel widths of the taps (summing to ``C``); each tap's cosine is taken on its own.
        top_k: the foreground mean is over this many best foreground cosines (fewer if the support has fewer
            positions).

    Returns:
        ``(E, 3 · taps, h, w)``: per tap, the best foreground cosine, the mean of the ``top_k`` best
        foreground cosines, and the best background cosine (−1 where a shot has no such position), each
        taken per shot and averaged over the shots.

    Raises:
        ValueError: channel widths that do not sum to ``C``, or support features of another width.
    """
    e, k, c = support.shape[:3]
    if query.shape[1] != c:
        raise ValueError(f"query features have {query.shape[1]} channels, support features {c}")
    h, w = query.shape[-2:]
    weights = F.interpolate(masks.flatten(0, 1)[:, None].float(), size=support.shape[-2:], mode="area")
    fg = (weights > 0).view(e, 1, k, -1)  # (E, 1, k, h'·w'): any overlap counts
    q = normalise_taps(query.permute(0, 2, 3, 1).reshape(-1, c), groups).view(e, h * w, c)
    s = normalise_taps(support.permute(0, 1, 3, 4, 2).reshape(-1, c), groups).view(e, -1, c)
    scale = len(groups)  # normalise_taps leaves each tap with norm 1/sqrt(taps)
    stats = []
    for qg, sg in zip(q.split(list(groups), -1), s.split(list(groups), -1), strict=True):
        sim = (qg @ sg.transpose(1, 2) * scale).view(e, h * w, k, -1)  # per shot, cosines in [-1, 1]
        on = sim.masked_fill(~fg, -1.0)
        best = on.topk(min(top_k, on.shape[-1]), dim=-1).values
        stats += [best[..., 0].mean(-1), best.mean(-1).mean(-1), sim.masked_fill(fg, -1.0).amax(-1).mean(-1)]
    return torch.stack(stats, 1).view(e, -1, h, w)


class CorrelationSegmenter(nn.Module):
    """HSNet-style head on frozen features: correlations in, mask logits out (see the module docstring).

    Args:
        features: images ``(N, 3, H, W)`` → feature maps ``(N, C, h, w)`` (a
            :func:`~heads.fewshot.dense_features` of a frozen extractor, or a
            :class:`~heads.fewshot.FeatureCache` of it).
        groups: channel widths of the concatenated taps.
        top_k: foreground cosines averaged per query position.
        width: channels of the decoder's convolutions.
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], groups: Sequence[int], top_k: int = 5,
                 width: int = 64) -> None:
        super().__init__()
        if not groups or any(g < 1 for g in groups):
            raise ValueError(f"groups must be positive tap widths, got {list(groups)}")
        self.features, self.groups, self.top_k = features, list(groups), top_k
        inputs = 3 * len(self.groups)
        self.decoder = nn.Sequential(
            nn.Conv2d(inputs, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1))

    def forward(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                allow_empty_support: bool = False) -> torch.Tensor:
        """Mask logits of a batch of episodes.

        Args:
            support: ``(E, k, C, H, W)`` support images.
            support_mask: ``(E, k, H, W)`` bool support masks.
            query: ``(E, C, H, W)`` query images.
            allow_empty_support: accept all-background support masks (the empty-support control).

        Returns:
            ``(E, H, W)`` logits.

        Raises:
            ValueError: shapes that do not match, or an empty support mask (before any feature is computed).
        """
        check_episodes(support, support_mask, query, allow_empty_support)
        e, k = support.shape[:2]
        feats = self.features(torch.cat([support.flatten(0, 1), query]))
        fs, fq = feats[: e * k].view(e, k, *feats.shape[1:]), feats[e * k:]
        logits = self.decoder(correlation_maps(fq, fs, support_mask, self.groups, self.top_k))
        return F.interpolate(logits, size=query.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def predict(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                allow_empty_support: bool = False) -> torch.Tensor:
        """Binary query masks of a batch of episodes (a :data:`~heads.fewshot.Predictor`): logit > 0."""
        return self(support, support_mask, query, allow_empty_support) > 0


class CorrelationFewShotModule(EpisodeTraining, FewShotModule, FrozenFeatureModule):
    """Trains the HSNet-style correlation head on base-class episodes over frozen diffusion features.

    Features are per-pixel and content-seeded (an image's features do not depend on the episode that
    shows it), as for the prototype and label-transfer baselines; only the decoder trains (AdamW), on
    :class:`~heads.fewshot_diffews.EpisodeTraining`'s loss.

    Args:
        backbone: backbone name or folder.
        layers: taps (each a correlation of its own).
        timesteps: timesteps of the features.
        feature_size: side of the feature grid the correlations are taken on.
        top_k: foreground cosines averaged per query position.
        width: decoder width.
        lr: AdamW learning rate.
        num_classes: class-id space of the metric.
        vote: k-shot by per-shot vote instead of pooling all shots' positions.
    """

    def __init__(self, backbone: str = "sd-unet-scenes", layers: list[str] | None = None,
                 timesteps: list[int] | None = None, feature_size: int = 16, top_k: int = 5, width: int = 64,
                 lr: float = 1e-3, num_classes: int = 20, vote: bool = False) -> None:
        super().__init__(num_classes, vote, backbone=backbone, layers=layers or ["up_blocks.1"],
                         timesteps=timesteps or [0], readout=PerPixel(feature_size), noise="content")
        self.save_hyperparameters()
        self.lr = lr
        info = self.extractor.backbone.feature_info
        groups = [info[layer].channels for layer, _ in self.extractor.keys]
        self.model = CorrelationSegmenter(dense_features(self.extractor), groups, top_k, width)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the decoder (the backbone is frozen and out of the optimiser)."""
        return torch.optim.AdamW(self.head_parameters(), lr=self.lr)
