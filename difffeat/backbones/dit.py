"""Adapter for diffusers ``DiTTransformer2DModel`` (class-conditional latent or pixel DiT)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difffeat.backbones.base import Backbone
from difffeat.backbones.registry import register_adapter

__all__ = ["DiTBackbone"]


@register_adapter
class DiTBackbone(Backbone):
    """A DiT: patch embedding, ``transformer_blocks.i`` with adaLN-Zero conditioning, token outputs.

    Taps are ``pos_embed`` (patch tokens after embedding) and ``transformer_blocks.i``; both give
    ``(B, N, D)`` tokens on a ``sample_size / patch_size`` grid (readouts reshape them to maps on request).

    Args:
        model: the diffusers ``DiTTransformer2DModel``.
        schedule: its noise schedule (DiT's: linear β from 1e-4 to 0.02, T = 1000).
        class_label: the class id to condition on; ``None`` (default) uses the null class
            ``num_embeds_ada_norm``, the unconditional embedding DiT learns through label dropout.
        **kwargs: see :class:`Backbone`.
    """

    model_class = "DiTTransformer2DModel"

    def __init__(self, model: nn.Module, schedule: Any, class_label: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, schedule, **kwargs)
        num_classes = model.config.num_embeds_ada_norm
        self.class_label = num_classes if class_label is None else class_label
        if not 0 <= self.class_label <= num_classes:
            raise ValueError(f"class_label {class_label} out of range [0, {num_classes}] "
                             f"({num_classes} is the null class)")

    @property
    def null_class(self) -> int:
        """The label of the unconditional (dropped-label) embedding."""
        return int(self.model.config.num_embeds_ada_norm)

    def condition_spec(self) -> dict[str, Any]:
        """The class label the denoiser is conditioned on when no ``cond`` is passed."""
        return {"class_label": self.class_label}

    def tap_names(self) -> list[str]:
        """``pos_embed`` (the embedded patch tokens) and every transformer block, ``transformer_blocks.i``."""
        return ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The square patch grid of the latent, ``latent_size // patch_size`` per side."""
        side = self.latent_size // self.model.config.patch_size
        return side, side

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The DiT's prediction at ``t`` for class labels ``cond`` (default :attr:`class_label` for all)."""
        labels = cond if cond is not None else torch.full(t.shape, self.class_label, dtype=torch.long, device=t.device)
        return self.model(x_t, t, class_labels=labels).sample
