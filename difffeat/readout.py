"""Readouts: how a tap's activation becomes a feature.

Every readout takes the raw tap output, a map ``(B, C, H, W)`` or tokens ``(B, N, D)``, with the tap's
:class:`~difffeat.backbones.FeatureInfo`, and returns one layout chosen by ``output_fmt``: ``"NCHW"``
(channels first) or ``"NLC"`` (tokens). Token outputs are reshaped to their patch grid where a spatial
readout needs it. All readouts are linear in the activation, so averaging a noise ensemble before or
after the readout gives the same feature; the extractor averages before (cheaper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.backbones.base import FeatureInfo

__all__ = [
    "AdaptiveKxK",
    "GlobalAvg",
    "Identity",
    "PerPixel",
    "Readout",
    "TokenMean",
    "as_map",
    "as_tokens",
    "concat_features",
]

_FORMATS = ("NCHW", "NLC")


def as_map(x: torch.Tensor, info: FeatureInfo) -> torch.Tensor:
    """A tap output as ``(B, C, H, W)``: maps pass through, tokens fold onto ``info.grid``."""
    if x.ndim == 4:
        return x
    h, w = info.grid
    if x.shape[1] != h * w:
        raise ValueError(f"tap {info.name!r}: {x.shape[1]} tokens do not fill its {h}x{w} grid")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """A tap output as ``(B, N, C)``: tokens pass through, maps flatten row-major."""
    return x if x.ndim == 3 else x.flatten(2).transpose(1, 2)


class Readout(nn.Module):
    """Base readout.

    Args:
        output_fmt: ``"NCHW"`` or ``"NLC"`` for readouts with a spatial output.
    """

    def __init__(self, output_fmt: str = "NCHW") -> None:
        super().__init__()
        if output_fmt not in _FORMATS:
            raise ValueError(f"output_fmt must be one of {_FORMATS}, got {output_fmt!r}")
        self.output_fmt = output_fmt

    def forward(self, x: torch.Tensor, info: FeatureInfo) -> torch.Tensor:  # pragma: no cover - abstract
        """The feature read from tap output ``x`` (a map or tokens), which ``info`` describes."""
        raise NotImplementedError

    def _format(self, m: torch.Tensor) -> torch.Tensor:
        return m if self.output_fmt == "NCHW" else as_tokens(m)


class Identity(Readout):
    """The activation itself, as a map (tokens reshaped to their grid) or as tokens."""

    def forward(self, x: torch.Tensor, info: FeatureInfo) -> torch.Tensor:
        """``x`` as a map, or as tokens for ``output_fmt="NLC"``."""
        return self._format(as_map(x, info))


class GlobalAvg(Readout):
    """Mean over all spatial positions (or tokens): ``(B, C)``."""

    def forward(self, x: torch.Tensor, info: FeatureInfo) -> torch.Tensor:
        """The mean of ``x`` over its positions or tokens, ``(B, C)``."""
        return as_tokens(x).mean(1)


class TokenMean(GlobalAvg):
    """Mean over tokens, the usual readout of a ViT/DiT tap: ``(B, D)``. Same as :class:`GlobalAvg`."""


class AdaptiveKxK(Readout):
    """Adaptive average pooling to a ``k × k`` grid.

    Args:
        k: output grid side.
        flatten: return ``(B, C·k·k)`` instead of a ``k × k`` map or ``k²`` tokens.
        output_fmt: layout when not flattened.
    """

    def __init__(self, k: int = 4, flatten: bool = True, output_fmt: str = "NCHW") -> None:
        super().__init__(output_fmt)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.flatten = k, flatten

    def forward(self, x: torch.Tensor, info: FeatureInfo) -> torch.Tensor:
        """``x`` pooled to ``k × k``: ``(B, C·k·k)`` with ``flatten``, else a map or tokens per ``output_fmt``."""
        m = F.adaptive_avg_pool2d(as_map(x, info), self.k)
        return m.flatten(1) if self.flatten else self._format(m)


class PerPixel(Readout):
    """Bilinear upsampling to a common size, for dense (per-pixel) heads.

    Args:
        size: output ``(H, W)`` (or one int); ``None`` keeps the tap's resolution.
        output_fmt: ``"NCHW"`` or ``"NLC"``.
    """

    def __init__(self, size: int | Sequence[int] | None = None, output_fmt: str = "NCHW") -> None:
        super().__init__(output_fmt)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)

    def forward(self, x: torch.Tensor, info: FeatureInfo) -> torch.Tensor:
        """``x`` as a map resized bilinearly to ``size`` (unless ``None``), in ``output_fmt``."""
        m = as_map(x, info)
        if self.size is not None and tuple(m.shape[-2:]) != self.size:
            m = F.interpolate(m, size=self.size, mode="bilinear", align_corners=False)
        return self._format(m)


def concat_features(features: Mapping[tuple[str, int], torch.Tensor],
                    keys: Sequence[tuple[str, int]] | None = None) -> torch.Tensor:
    """Concatenates taps along the channel axis (dim 1 for NCHW and flat features, -1 for NLC).

    Args:
        features: the extractor's ``{(layer, t): tensor}``.
        keys: which taps, in which order (default: all, in dict order).
    """
    keys = list(features) if keys is None else list(keys)
    parts = [features[k] for k in keys]
    dim = -1 if parts[0].ndim == 3 else 1
    return torch.cat(parts, dim=dim)
