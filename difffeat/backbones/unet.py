"""Adapters for diffusers U-Nets.

Pixel-space ``UNet2DModel`` and Stable-Diffusion-shaped ``UNet2DConditionModel``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from difffeat.backbones.base import Backbone
from difffeat.backbones.registry import register_adapter
from difffeat.digest import tensor_digest

__all__ = ["UNet2DBackbone", "UNet2DConditionBackbone", "unet_tap_names"]

log = logging.getLogger(__name__)


def unet_tap_names(model: nn.Module) -> list[str]:
    """The tap names of a diffusers U-Net: ``conv_in``, its blocks, and their resnets and attentions.

    Block outputs (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) and, inside each block, the
    outputs of its resnets and attentions (``up_blocks.1.resnets.0``, ``up_blocks.1.attentions.2``).
    """
    names = ["conv_in"]
    for group in ("down_blocks", "mid_block", "up_blocks"):
        blocks = [(group, model.mid_block)] if group == "mid_block" else [
            (f"{group}.{i}", b) for i, b in enumerate(getattr(model, group))]
        for prefix, block in blocks:
            if block is None:
                continue
            names.append(prefix)
            for part in ("resnets", "attentions"):
                names += [f"{prefix}.{part}.{j}" for j in range(len(getattr(block, part, None) or []))]
    return names


@register_adapter
class UNet2DBackbone(Backbone):
    """An unconditional (or class-conditional) pixel-space ``UNet2DModel``, as trained by DDPM.

    Args:
        model: the diffusers ``UNet2DModel``.
        schedule: its noise schedule (diffusers' DDPM default: linear β from 1e-4 to 0.02, T = 1000).
        class_label: class id given to a class-conditional model (``num_class_embeds`` set); ignored
            otherwise.
        **kwargs: see :class:`Backbone`.
    """

    model_class = "UNet2DModel"

    def __init__(self, model: nn.Module, schedule: Any, class_label: int = 0, **kwargs: Any) -> None:
        super().__init__(model, schedule, **kwargs)
        self.class_label = class_label

    def tap_names(self) -> list[str]:
        """The U-Net's taps (:func:`unet_tap_names`)."""
        return unet_tap_names(self.model)

    def condition_spec(self) -> dict[str, Any]:
        """The class label of a class-conditional model; ``{}`` for an unconditional one."""
        return {"class_label": self.class_label} if self.model.config.num_class_embeds is not None else {}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The U-Net's prediction at ``t``; a class-conditional one gets ``cond`` (default :attr:`class_label`)."""
        labels = None
        if self.model.config.num_class_embeds is not None:
            labels = cond if cond is not None else torch.full(t.shape, self.class_label, dtype=torch.long,
                                                                  device=t.device)
        return self.model(x_t, t, class_labels=labels).sample


@register_adapter
class UNet2DConditionBackbone(Backbone):
    """A Stable-Diffusion-shaped ``UNet2DConditionModel`` (cross-attention on text embeddings).

    The text condition is, in order of preference: ``cond`` passed at call time (``(B, L, D)``
    ``encoder_hidden_states``), ``encoder_hidden_states`` given here, the empty prompt read from a
    ``null_embedding`` safetensors file (key ``prompt_embeds``), or zeros of shape ``(1, 77, D)``. The
    zero fallback is logged: it is what a model trained with empty-prompt dropout sees least badly, but a
    real checkpoint should be given its own empty-prompt embedding (difffeat does not ship a text
    encoder; encode ``""`` once with the pipeline's CLIP and save it).

    Args:
        model: the diffusers ``UNet2DConditionModel``.
        schedule: its noise schedule (SD's default: scaled-linear β from 0.00085 to 0.012, T = 1000).
        vae: optional ``AutoencoderKL``; images are then encoded to latents with the posterior mean.
        encoder_hidden_states: a fixed condition ``(1 or B, L, D)``, cached as a buffer.
        null_embedding: path of a safetensors file with a ``prompt_embeds`` tensor ``(1, L, D)``.
        **kwargs: see :class:`Backbone`; its ``pipeline_dir`` is searched for
            ``null_embedding.safetensors`` when no condition is given.
    """

    model_class = "UNet2DConditionModel"
    default_scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # noqa: RUF012

    def __init__(self, model: nn.Module, schedule: Any, encoder_hidden_states: torch.Tensor | None = None,
                 null_embedding: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(model, schedule, **kwargs)
        if encoder_hidden_states is None:
            encoder_hidden_states = self._null_embedding(null_embedding, self.pipeline_dir)
        dim = model.config.cross_attention_dim
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != dim:
            raise ValueError(f"encoder_hidden_states must have shape (B, L, {dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}")
        self.register_buffer("encoder_hidden_states", encoder_hidden_states.float(), persistent=False)

    def _null_embedding(self, path: str | Path | None, pipeline_dir: str | Path | None) -> torch.Tensor:
        if path is None and pipeline_dir is not None and (Path(pipeline_dir) / "null_embedding.safetensors").exists():
            path = Path(pipeline_dir) / "null_embedding.safetensors"
        if path is not None:
            tensors = load_file(str(path))
            if "prompt_embeds" not in tensors:
                raise KeyError(f"{path} has no 'prompt_embeds' tensor; found {sorted(tensors)}")
            return tensors["prompt_embeds"]
        log.warning("no encoder_hidden_states or null_embedding given for %s: conditioning on zeros", self.name)
        return torch.zeros(1, 77, self.model.config.cross_attention_dim)

    def tap_names(self) -> list[str]:
        """The U-Net's taps (:func:`unet_tap_names`)."""
        return unet_tap_names(self.model)

    def condition_spec(self) -> dict[str, Any]:
        """The digest of the default text condition, ``encoder_hidden_states``."""
        # a non-persistent buffer, so outside the weights digest: the prompt is keyed here
        return {"encoder_hidden_states": tensor_digest(self.encoder_hidden_states)}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The U-Net's prediction at ``t``, cross-attending to ``cond`` (default ``encoder_hidden_states``).

        A condition of batch 1 is expanded to the batch of ``x_t``.

        Raises:
            ValueError: the condition's batch is neither 1 nor that of ``x_t``.
        """
        ehs = cond if cond is not None else self.encoder_hidden_states
        if ehs.shape[0] == 1:
            ehs = ehs.expand(x_t.shape[0], -1, -1)
        elif ehs.shape[0] != x_t.shape[0]:
            raise ValueError(f"encoder_hidden_states has batch {ehs.shape[0]}, the latents {x_t.shape[0]}")
        return self.model(x_t, t, encoder_hidden_states=ehs.to(x_t.dtype)).sample
