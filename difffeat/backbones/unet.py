"""Adapters for diffusers U-Nets.

Pixel-space ``UNet2DModel`` and Stable-Diffusion-shaped ``UNet2DConditionModel``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.backbones.base import Backbone
from difffeat.backbones.registry import register_adapter
from difffeat.backbones.text import PromptEncoder, TextConditioned, load_text_encoder, tokenize

__all__ = ["UNet2DBackbone", "UNet2DConditionBackbone", "encode_clip_prompts", "unet_tap_names"]

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


def encode_clip_prompts(pipeline_dir: Path) -> PromptEncoder:
    """SD-1/2's prompt encoding: CLIP's last hidden state over 77 padded tokens.

    As diffusers' ``StableDiffusionPipeline.encode_prompt`` without ``clip_skip``: ``padding="max_length"``
    to the tokenizer's ``model_max_length``, truncated, the attention mask passed only where the text
    encoder's config sets ``use_attention_mask``.
    """
    encoder, tokenizer = load_text_encoder(pipeline_dir)
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenize(tokenizer, prompts)
        mask = tokens["attention_mask"] if use_mask else None
        return {"encoder_hidden_states": encoder(tokens["input_ids"], attention_mask=mask)[0].float()}

    return encode


@register_adapter
class UNet2DConditionBackbone(TextConditioned):
    """A Stable-Diffusion-1/2-shaped ``UNet2DConditionModel`` (cross-attention on CLIP text embeddings).

    The condition is ``encoder_hidden_states`` ``(B, L, D)``: per call (a tensor, or ``prompts`` through
    the extractor), else the default resolved as :class:`~difffeat.backbones.text.TextConditioned` says: the
    tensor given here, a ``null_embedding`` file, the empty prompt encoded by the pipeline's CLIP text
    encoder, or zeros ``(1, 77, D)`` (logged: a real checkpoint should be given its own empty prompt).

    Args:
        model: the diffusers ``UNet2DConditionModel`` (without SDXL's ``text_time`` embedding; see
            :class:`~difffeat.backbones.sdxl.SDXLBackbone`).
        schedule: its noise schedule (SD's default: scaled-linear β from 0.00085 to 0.012, T = 1000).
        vae: optional ``AutoencoderKL``; images are then encoded to latents with the posterior mean.
        encoder_hidden_states: a fixed default condition ``(1 or B, L, D)``.
        **kwargs: see :class:`~difffeat.backbones.text.TextConditioned` (``condition``, ``null_embedding``,
            ``pipeline_dir``).
    """

    model_class = "UNet2DConditionModel"
    default_scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # noqa: RUF012

    def __init__(self, model: nn.Module, schedule: Any, encoder_hidden_states: torch.Tensor | None = None,
                 **kwargs: Any) -> None:
        if encoder_hidden_states is not None:
            kwargs["condition"] = {**(kwargs.get("condition") or {}), "encoder_hidden_states": encoder_hidden_states}
        super().__init__(model, schedule, **kwargs)

    @classmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        """Every ``UNet2DConditionModel`` but SDXL's (``addition_embed_type="text_time"``)."""
        return config.get("addition_embed_type") != "text_time"

    def null_shapes(self) -> dict[str, tuple[int, ...]]:
        """77 zero tokens of the cross-attention width."""
        return {"encoder_hidden_states": (1, 77, int(self.model.config.cross_attention_dim))}

    def load_prompt_encoder(self) -> PromptEncoder:
        """CLIP's last hidden state (:func:`encode_clip_prompts`)."""
        return encode_clip_prompts(self.pipeline_dir)

    def tap_names(self) -> list[str]:
        """The U-Net's taps (:func:`unet_tap_names`)."""
        return unet_tap_names(self.model)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The U-Net's prediction at ``t``, cross-attending to ``cond`` (default: the default condition).

        Raises:
            ValueError: the condition's batch is neither 1 nor that of ``x_t``.
        """
        c = self.condition(cond, x_t.shape[0], x_t.dtype, x_t.device)
        return self.model(x_t, t, encoder_hidden_states=c["encoder_hidden_states"]).sample
