"""``FeatureExtractor``: layers × timesteps × noise-ensemble features from one call.

For a batch of clean images the extractor

1. encodes them to the denoiser's input space (identity for pixel models, VAE mean for latent ones);
2. for each ensemble member draws noise seeded per sample (by dataset index), noises the batch at every
   requested timestep and stacks the timesteps along the batch axis, so one forward serves all ``t``;
3. runs the denoiser with forward hooks on the requested layers, stopping right after the deepest one;
4. averages the taps over the ensemble and applies the readout.

It returns ``{(layer, t): Tensor}``. The backbone is frozen (``requires_grad_(False)``, ``eval()``) and
extraction runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from difffeat.backbones.base import Backbone
from difffeat.noise import seeded_noise
from difffeat.readout import GlobalAvg, Readout

__all__ = ["FeatureExtractor", "FeatureKey", "feature_name", "parse_feature_name"]

FeatureKey = tuple[str, int]


def feature_name(key: FeatureKey) -> str:
    """The string form of a tap key, ``"up_blocks.1@t10"``, used in stores and reports."""
    return f"{key[0]}@t{key[1]}"


def parse_feature_name(name: str) -> FeatureKey:
    """Inverse of :func:`feature_name`."""
    layer, _, t = name.rpartition("@t")
    if not layer or not t.isdigit():
        raise ValueError(f"{name!r} is not a feature name of the form 'layer@t<int>'")
    return layer, int(t)


class FeatureExtractor(nn.Module):
    """Taps a frozen diffusion backbone at several layers and timesteps in one call.

    Args:
        backbone: a :class:`~difffeat.backbones.Backbone`.
        layers: tap names from ``backbone.feature_info``; an unknown name raises a ``KeyError`` that
            lists the valid ones.
        timesteps: DDPM indices in ``[0, T-1]`` (0 = least noise; see :mod:`difffeat.noise`).
        ensemble: noise draws averaged per feature (the same draw is shared by all timesteps of a sample).
        seed: base seed; noise for sample ``i``, member ``e`` comes from ``sample_seed(seed, i, e)``.
        readout: how a tap becomes a feature (default :class:`~difffeat.readout.GlobalAvg`).
        dtype: compute dtype of the backbone (e.g. ``torch.bfloat16`` on a GPU); features are returned
            as float32.
        early_exit: stop the forward after the deepest tap (``False`` runs the whole network; the
            features are identical, only slower).
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str], timesteps: Sequence[int], ensemble: int = 1,
                 seed: int = 0, readout: Readout | None = None, dtype: torch.dtype | None = None,
                 early_exit: bool = True) -> None:
        super().__init__()
        if not layers:
            raise ValueError(f"give at least one layer; valid layers: {list(backbone.feature_info)}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        backbone.modules_by_name(layers)  # fails early on unknown names, listing valid ones
        self.backbone = backbone.requires_grad_(False).eval()
        if dtype is not None:
            self.backbone.to(dtype)
        self.layers = list(dict.fromkeys(layers))
        self.timesteps = backbone.schedule.validate(timesteps)
        if not self.timesteps:
            raise ValueError("give at least one timestep")
        self.ensemble, self.seed, self.early_exit = ensemble, seed, early_exit
        self.readout = readout if readout is not None else GlobalAvg()

    @classmethod
    def from_name(cls, backbone: str, layers: Sequence[str], timesteps: Sequence[int],
                  backbone_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> FeatureExtractor:
        """Builds the backbone with ``create_backbone(backbone, **backbone_kwargs)`` and taps it."""
        from difffeat.backbones import create_backbone

        return cls(create_backbone(backbone, **(backbone_kwargs or {})), layers, timesteps, **kwargs)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The readout follows ``mode``; the backbone stays in eval mode (frozen means frozen)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def keys(self) -> list[FeatureKey]:
        """The ``(layer, t)`` keys of the returned dict, layer-major."""
        return [(layer, t) for layer in self.layers for t in self.timesteps]

    def spec(self) -> dict[str, Any]:
        """What determines the features besides weights and data: recorded in feature-store keys."""
        readout = {k: v for k, v in vars(self.readout).items() if not k.startswith("_") and k != "training"}
        return {"backbone": self.backbone.name, "layers": self.layers, "timesteps": self.timesteps,
                "ensemble": self.ensemble, "seed": self.seed, "readout": type(self.readout).__name__,
                "readout_args": readout}

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int] | None = None,
                cond: Any = None) -> dict[FeatureKey, torch.Tensor]:
        """Features of ``images`` (``(B, C, H, W)`` in ``[-1, 1]``).

        Args:
            images: clean images (or latents for a latent backbone without a VAE).
            indices: the samples' dataset indices, which seed their noise. Pass them whenever features
                must not depend on batching; the default ``0 … B-1`` ties noise to batch position.
            cond: per-sample condition (class labels, or ``(B, L, D)`` text embeddings); default the
                backbone's unconditional one.

        Returns:
            ``{(layer, t): feature}`` with float32 features in the readout's layout.
        """
        param = next(self.backbone.parameters())
        device, dtype = param.device, param.dtype
        x0 = self.backbone.encode(images.to(device=device, dtype=dtype))
        b = x0.shape[0]
        indices = list(range(b)) if indices is None else [int(i) for i in indices]
        if len(indices) != b:
            raise ValueError(f"got {len(indices)} indices for a batch of {b} images")
        nt = len(self.timesteps)
        t = torch.tensor(self.timesteps, device=device).repeat_interleave(b)  # t-major: [t0 × B, t1 × B, ...]
        x0_rep = x0.repeat(nt, *([1] * (x0.ndim - 1)))
        cond_rep = cond.repeat(nt, *([1] * (cond.ndim - 1))) if isinstance(cond, torch.Tensor) else cond
        sums: dict[str, torch.Tensor] = {}
        for member in range(self.ensemble):
            noise = seeded_noise(x0.shape[1:], indices, self.seed, member, dtype=dtype, device=device)
            x_t = self.backbone.schedule.add_noise(x0_rep, noise.repeat(nt, *([1] * (x0.ndim - 1))), t)
            with self.backbone.tap(self.layers, stop_early=self.early_exit) as found:
                self.backbone.run(x_t, t, cond_rep)
            for layer in self.layers:
                value = found[layer].float()
                sums[layer] = value if layer not in sums else sums[layer] + value
        infos = self.backbone.feature_info
        out: dict[FeatureKey, torch.Tensor] = {}
        for layer in self.layers:
            per_t = (sums[layer] / self.ensemble).split(b)
            for ti, step in enumerate(self.timesteps):
                out[(layer, step)] = self.readout(per_t[ti], infos[layer]).contiguous()
        return out
