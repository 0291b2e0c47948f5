"""Adapter for Stable Diffusion XL's ``UNet2DConditionModel`` (``addition_embed_type="text_time"``).

SDXL's U-Net takes, besides the noisy latent and the timestep, three conditions: ``encoder_hidden_states``
(both CLIP text encoders' penultimate hidden states, concatenated along the width), the pooled text embedding
``text_embeds`` (the second encoder's projected output) and six ``time_ids`` (original size, crop corner,
target size), embedded together by ``add_embedding``. Prompts are encoded exactly as diffusers'
``StableDiffusionXLPipeline.encode_prompt`` does with ``clip_skip=None`` (:func:`encode_sdxl_prompts`); the
``time_ids`` are built from the size of the images being read, as the pipeline's ``_get_add_time_ids`` does
for an uncropped image generated at that size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.backbones.registry import register_adapter
from difffeat.backbones.text import (
    PromptEncoder,
    TextConditioned,
    has_component,
    load_text_encoder,
    pipeline_components,
    tokenize,
)
from difffeat.backbones.unet import unet_tap_names

__all__ = ["SDXLBackbone", "encode_sdxl_prompts", "sdxl_unet_config"]

#: ``time_ids`` per image: original (h, w), crop top-left (y, x), target (h, w)
TIME_IDS = 6

#: pixels per latent cell when a backbone has no VAE (diffusers' SDXL pipeline assumes 8 then)
DEFAULT_VAE_FACTOR = 8



def encode_sdxl_prompts(pipeline_dir: str | Path) -> PromptEncoder:
    """SDXL's prompt encoding, as ``StableDiffusionXLPipeline.encode_prompt`` with ``clip_skip=None``.

    Each prompt goes to both tokenizers (``prompt_2`` defaults to ``prompt``), padded to the tokenizer's
    ``model_max_length`` and truncated; the encoders run without an attention mask, with
    ``output_hidden_states=True``. ``encoder_hidden_states`` is the concatenation (last dimension) of every
    encoder's ``hidden_states[-2]``; ``text_embeds`` the first 2-D ``output[0]`` met, i.e. the projected
    pooled output of ``text_encoder_2`` (a ``CLIPTextModelWithProjection``). A pipeline without
    ``text_encoder`` (the refiner's layout) uses ``text_encoder_2`` alone, as the pipeline does.

    Args:
        pipeline_dir: an SDXL pipeline folder.

    Returns:
        prompts → ``{"encoder_hidden_states": (B, 77, D1 + D2), "text_embeds": (B, P)}`` in float32.

    Raises:
        FileNotFoundError: no ``text_encoder_2`` or a missing tokenizer (named).
    """
    pipeline_dir = Path(pipeline_dir)
    components = pipeline_components(pipeline_dir)
    pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    if not has_component(pipeline_dir, components, "text_encoder_2"):
        raise FileNotFoundError(f"{pipeline_dir} has no 'text_encoder_2': SDXL's pooled text embedding comes from it")
    if not has_component(pipeline_dir, components, "text_encoder"):
        pairs = pairs[1:]
    loaded = [load_text_encoder(pipeline_dir, encoder, tokenizer) for encoder, tokenizer in pairs]

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for encoder, tokenizer in loaded:
            out = encoder(tokenize(tokenizer, prompts)["input_ids"], output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError(f"{pipeline_dir}: no text encoder returns a pooled (B, P) first output; SDXL's "
                             f"text_encoder_2 must be a CLIPTextModelWithProjection")
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1).float(), "text_embeds": pooled.float()}

    return encode


def sdxl_unet_config(block_out_channels: list[int], sample_size: int, cross_attention_dim: int, pooled_dim: int,
                     addition_time_embed_dim: int = 256, layers_per_block: int = 2, heads: int | list[int] = 8,
                     transformer_layers_per_block: int | list[int] = 1) -> dict[str, Any]:
    """An SDXL-shaped ``UNet2DConditionModel`` config.

    No cross-attention in the first (highest-resolution) level, cross-attention in the others and the mid
    block, linear projections in the transformers, and the ``text_time`` added embedding whose input width
    is ``6 · addition_time_embed_dim + pooled_dim``, as SDXL-base's config (``block_out_channels``
    ``[320, 640, 1280]``, ``cross_attention_dim`` 2048, ``pooled_dim`` 1280, ``addition_time_embed_dim`` 256,
    ``transformer_layers_per_block`` ``[1, 2, 10]``).
    """
    n = len(block_out_channels)
    return {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
        "block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": heads, "use_linear_projection": True,
        "transformer_layers_per_block": transformer_layers_per_block, "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": TIME_IDS * addition_time_embed_dim + pooled_dim,
        "norm_num_groups": min(32, block_out_channels[0]),
    }


@register_adapter
class SDXLBackbone(TextConditioned):
    """Stable Diffusion XL's U-Net: two CLIP encoders' hidden states, a pooled embedding and size ``time_ids``.

    The condition dict holds ``encoder_hidden_states`` ``(B, L, D1 + D2)`` and ``text_embeds`` ``(B, P)``
    (:func:`encode_sdxl_prompts`). The default condition follows
    :class:`~difffeat.backbones.text.TextConditioned`, with SDXL's unconditional branch as the pipeline
    builds it for a missing negative prompt: zeros where ``model_index.json`` sets
    ``force_zeros_for_empty_prompt`` (the pipeline's default, true for SDXL-base; a folder that does not say
    is taken as true), else the encoded empty prompt.

    ``time_ids`` are not a condition to pass: each forward builds them from its latents' size as
    ``StableDiffusionXLPipeline._get_add_time_ids`` does for an image generated at that size without
    cropping, ``(H, W, 0, 0, H, W)`` in pixels (latent size × the VAE factor; ×8 without a VAE, the pipeline's
    assumption). Features thus see the micro-conditioning of "an uncropped image of this size", the same for
    every image of a batch.

    Images must have sides divisible by the VAE factor times the U-Net's downsampling (``2 ** num_upsamplers``),
    else the U-Net would silently pad its up path; :meth:`encode` and :meth:`denoise` refuse other sizes.

    Args:
        model: the diffusers ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``.
        schedule: its noise schedule (SDXL's: scaled-linear β from 0.00085 to 0.012, T = 1000).
        **kwargs: see :class:`~difffeat.backbones.text.TextConditioned` (``condition``, ``null_embedding``,
            ``pipeline_dir``, ``vae``, ``name``).

    Raises:
        ValueError: the model's added-embedding width is not ``6 · addition_time_embed_dim`` plus a positive
            pooled width, or a condition of the wrong width.
    """

    model_class = "UNet2DConditionModel"
    default_scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # noqa: RUF012
    condition_keys = ("encoder_hidden_states", "text_embeds")

    def __init__(self, model: nn.Module, schedule: Any, **kwargs: Any) -> None:
        config = model.config
        if config.get("addition_time_embed_dim") is None or getattr(model, "add_embedding", None) is None:
            raise ValueError("SDXLBackbone needs a U-Net with addition_embed_type='text_time' and "
                             "addition_time_embed_dim set")
        if model.add_embedding.linear_1.in_features - TIME_IDS * int(config.addition_time_embed_dim) <= 0:
            raise ValueError(f"the U-Net's added embedding takes {model.add_embedding.linear_1.in_features} values, "
                             f"no more than {TIME_IDS} time ids × addition_time_embed_dim "
                             f"{config.addition_time_embed_dim}: it leaves no room for the pooled text embedding")
        super().__init__(model, schedule, **kwargs)

    @classmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        """U-Nets with SDXL's ``text_time`` added embedding."""
        return config.get("addition_embed_type") == "text_time"

    # ----------------------------------------------------------------- condition
    @property
    def pooled_dim(self) -> int:
        """Width of ``text_embeds`` the model takes: the added embedding's input less the six embedded time ids."""
        return int(self.model.add_embedding.linear_1.in_features
                   - TIME_IDS * int(self.model.config.addition_time_embed_dim))

    def _text_length(self) -> int:
        """Tokens per prompt: the tokenizers' ``model_max_length`` (77 for CLIP)."""
        if self.pipeline_dir is not None:
            for name in ("tokenizer_2", "tokenizer"):
                path = self.pipeline_dir / name / "tokenizer_config.json"
                if path.exists():
                    length = json.loads(path.read_text()).get("model_max_length")
                    if isinstance(length, int) and length < 100_000:
                        return length
        return 77

    def null_shapes(self) -> dict[str, tuple[int, ...]]:
        """Zeros of the text length × ``cross_attention_dim`` and of the pooled width."""
        return {"encoder_hidden_states": (1, self._text_length(), int(self.model.config.cross_attention_dim)),
                "text_embeds": (1, self.pooled_dim)}

    def force_zeros_for_empty_prompt(self) -> bool:
        """``model_index.json``'s ``force_zeros_for_empty_prompt`` (the pipeline's default, true, where absent)."""
        if self.pipeline_dir is None:
            return True
        return bool(pipeline_components(self.pipeline_dir).get("force_zeros_for_empty_prompt", True))

    def empty_condition(self) -> dict[str, torch.Tensor]:
        """The pipeline's negative condition for no negative prompt: zeros, or the encoded ``""`` (see the class)."""
        if self.force_zeros_for_empty_prompt():
            return {key: torch.zeros(shape) for key, shape in self.null_shapes().items()}
        return self.encode_prompts([""])

    def load_prompt_encoder(self) -> PromptEncoder:
        """Both CLIP encoders, as the SDXL pipeline uses them (:func:`encode_sdxl_prompts`)."""
        return encode_sdxl_prompts(self.pipeline_dir)

    def check_condition(self, key: str, value: torch.Tensor) -> None:
        """Shape check; for ``text_embeds`` the pipeline's check of the added embedding's width.

        Raises:
            ValueError: a wrong shape; a pooled width that does not fill the added embedding with the time ids.
        """
        if key == "text_embeds" and value.ndim == 2 and value.shape[-1] != self.pooled_dim:
            cfg = self.model.config
            raise ValueError(
                f"the U-Net's added embedding takes {self.model.add_embedding.linear_1.in_features} values, but "
                f"{TIME_IDS} time ids × addition_time_embed_dim {cfg.addition_time_embed_dim} + text_embeds width "
                f"{value.shape[-1]} give {TIME_IDS * cfg.addition_time_embed_dim + value.shape[-1]}: the text "
                f"encoder's projection_dim does not fit this U-Net")
        super().check_condition(key, value)

    # ----------------------------------------------------------------- size
    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (8 without a VAE, as the SDXL pipeline assumes)."""
        if self.vae is None:
            return DEFAULT_VAE_FACTOR
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_factor(self) -> int:
        """Latent cells per cell of the U-Net's deepest level (``2 ** num_upsamplers``)."""
        return 2 ** int(getattr(self.model, "num_upsamplers", len(self.model.config.block_out_channels) - 1))

    def _check_size(self, h: int, w: int, per_cell: int, what: str) -> None:
        multiple = per_cell * self.unet_factor
        if h % multiple or w % multiple:
            parts = f"VAE factor {per_cell} × U-Net downsampling {self.unet_factor}" if per_cell > 1 else (
                f"U-Net downsampling {self.unet_factor}")
            raise ValueError(f"{what} of size {h}x{w} do not fit SDXL's U-Net: both sides must be multiples of "
                             f"{multiple} ({parts}); resize or crop to e.g. "
                             f"{max(multiple, h // multiple * multiple)}x{max(multiple, w // multiple * multiple)}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images to latents (see the base), after refusing a size that is not a multiple of the VAE × U-Net factor.

        Raises:
            ValueError: a side not divisible by the VAE factor times the U-Net's downsampling.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            per_cell = self.vae_factor if self.vae is not None else 1
            self._check_size(images.shape[-2], images.shape[-1], per_cell,
                             "images" if self.vae is not None else "latents")
        return super().encode(images)

    def time_ids(self, x_t: torch.Tensor) -> torch.Tensor:
        """``(B, 6)`` ``time_ids`` ``(H, W, 0, 0, H, W)`` for latents ``x_t`` (H, W in pixels)."""
        h, w = (int(s) * self.vae_factor for s in x_t.shape[-2:])
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=x_t.dtype, device=x_t.device)
        return ids.expand(x_t.shape[0], TIME_IDS)

    # ----------------------------------------------------------------- taps and forward
    def tap_names(self) -> list[str]:
        """The U-Net's taps (:func:`~difffeat.backbones.unet.unet_tap_names`)."""
        return unet_tap_names(self.model)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The U-Net's ε prediction at ``t`` with ``added_cond_kwargs={"text_embeds", "time_ids"}``.

        Raises:
            ValueError: latents whose size the U-Net's downsampling does not divide, or a condition whose
                batch is neither 1 nor that of ``x_t``.
        """
        self._check_size(x_t.shape[-2], x_t.shape[-1], 1, "latents")
        c = self.condition(cond, x_t.shape[0], x_t.dtype, x_t.device)
        self.check_condition("text_embeds", c["text_embeds"])
        added = {"text_embeds": c["text_embeds"], "time_ids": self.time_ids(x_t)}
        return self.model(x_t, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added).sample
