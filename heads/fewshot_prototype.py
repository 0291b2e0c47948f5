"""Training-free few-shot segmentation by prototypes (PANet-style) on frozen diffusion features.

Foreground and background prototypes are masked averages of the support features; query pixels take
the label of the prototype they are most cosine-similar to. Nothing is trained: the LightningModule
only evaluates (``difffeat test``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.readout import PerPixel
from heads.base import FrozenFeatureModule
from heads.fewshot import FewShotModule, check_episode, dense_features

__all__ = ["PrototypeFewShotModule", "PrototypeSegmenter", "masked_average"]


def masked_average(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average pooling.

    Masks are brought to the feature resolution by area interpolation, so they act as soft weights.

    Args:
        features: ``(N, C, h, w)``.
        masks: ``(N, H, W)``.

    Returns:
        ``(N, C)``.
    """
    weights = F.interpolate(masks[:, None].float(), size=features.shape[-2:], mode="area")
    return (features * weights).sum((2, 3)) / weights.sum((2, 3)).clamp(min=1e-6)


class PrototypeSegmenter(nn.Module):
    """PANet-style training-free few-shot segmentation.

    Foreground and background prototypes are masked averages of the support features (averaged over
    shots); every query position is scored by ``scale · cos(feature, prototype)`` and the two scores are
    upsampled to the image and compared.

    Args:
        features: images ``(N, 3, H, W)`` → feature maps ``(N, C, h, w)`` (e.g.
            :func:`~heads.fewshot.dense_features`).
        scale: cosine temperature (PANet uses 20).
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], scale: float = 20.0) -> None:
        super().__init__()
        self.features, self.scale = features, scale

    def forward(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Scores query pixels against the prototypes of one episode.

        Args:
            support: ``(k, C, H, W)`` support images.
            support_mask: ``(k, H, W)`` bool support masks.
            query: ``(B, C, H, W)`` query images.

        Returns:
            Background/foreground logits ``(B, 2, H, W)``.

        Raises:
            ValueError: see :func:`~heads.fewshot.check_episode` (before any feature is computed).
        """
        check_episode(support, support_mask, query)
        feats = self.features(torch.cat([support, query]))
        fs, fq = feats[: len(support)], feats[len(support):]
        protos = torch.stack([masked_average(fs, ~support_mask).mean(0), masked_average(fs, support_mask).mean(0)])
        sim = F.cosine_similarity(fq[:, None], protos[None, :, :, None, None], dim=2) * self.scale
        return F.interpolate(sim, size=query.shape[-2:], mode="bilinear", align_corners=False)

    def predict(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Binary query masks of a batch of episodes (a :data:`~heads.fewshot.Predictor`).

        Args:
            support: ``(E, k, C, H, W)``.
            support_mask: ``(E, k, H, W)``.
            query: ``(E, C, H, W)``.

        Returns:
            ``(E, H, W)`` bool: foreground where its score beats the background's.
        """
        return torch.stack([self(support[e], support_mask[e], query[e:e + 1])[0].argmax(0).bool()
                            for e in range(len(query))])


class PrototypeFewShotModule(FewShotModule, FrozenFeatureModule):
    """Evaluates the prototype baseline on episodes (``difffeat test``); it has no trainable parameter.

    A :class:`~heads.base.FrozenFeatureModule` on online per-pixel features; their noise is seeded by
    image content (an image's features do not depend on the episode that shows it).

    Args:
        backbone: backbone name or folder (any backbone whose taps give maps).
        layers: taps whose features make the prototypes (concatenated).
        timesteps: timesteps of the features (concatenated).
        feature_size: side of the per-pixel features.
        scale: cosine temperature.
        num_classes: class-id space of the metric.
        vote: k-shot by per-shot vote instead of prototypes averaged over shots.
    """

    def __init__(self, backbone: str = "sd-unet-scenes", layers: list[str] | None = None,
                 timesteps: list[int] | None = None, feature_size: int = 16, scale: float = 20.0,
                 num_classes: int = 20, vote: bool = False) -> None:
        super().__init__(num_classes, vote, backbone=backbone, layers=layers or ["up_blocks.1"],
                         timesteps=timesteps or [0], readout=PerPixel(feature_size), noise="content")
        self.save_hyperparameters()
        self.model = PrototypeSegmenter(dense_features(self.extractor), scale)
