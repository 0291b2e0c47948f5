"""Adapter for diffusers ``PixArtTransformer2DModel`` (PixArt-α and PixArt-Σ).

PixArt is a DiT with cross-attention to T5 text embeddings and adaLN-single timestep conditioning. Its
condition is T5's last hidden state over a fixed number of padded tokens with the matching attention mask;
PixArt-α at 1024 px also embeds the image resolution and aspect ratio ("micro-conditions").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.backbones.registry import register_adapter
from difffeat.backbones.text import PromptEncoder, TextConditioned, load_text_encoder, tokenize

__all__ = ["MAX_SEQUENCE_LENGTH", "PixArtBackbone", "encode_t5_prompts", "max_sequence_length", "pixart_config"]

#: T5 tokens per prompt by pipeline class, the ``max_sequence_length`` defaults of diffusers' pipelines
MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}

#: tokens for a folder whose ``model_index.json`` names neither pipeline (PixArt-α's, the original length)
DEFAULT_MAX_SEQUENCE_LENGTH = 120

#: pixels per latent cell when a backbone has no VAE (diffusers' PixArt pipelines assume 8 then)
DEFAULT_VAE_FACTOR = 8


def max_sequence_length(pipeline_dir: str | Path | None) -> int:
    """T5 tokens per prompt for a pipeline folder: 120 for ``PixArtAlphaPipeline``, 300 for ``PixArtSigmaPipeline``.

    The pipeline class is read from ``model_index.json``'s ``_class_name``; any other folder (or none) gets
    :data:`DEFAULT_MAX_SEQUENCE_LENGTH`.
    """
    if pipeline_dir is None or not (Path(pipeline_dir) / "model_index.json").exists():
        return DEFAULT_MAX_SEQUENCE_LENGTH
    name = json.loads((Path(pipeline_dir) / "model_index.json").read_text()).get("_class_name")
    return MAX_SEQUENCE_LENGTH.get(name, DEFAULT_MAX_SEQUENCE_LENGTH)


def encode_t5_prompts(pipeline_dir: str | Path, max_length: int) -> PromptEncoder:
    """PixArt's prompt encoding, as ``PixArtAlphaPipeline.encode_prompt`` / ``PixArtSigmaPipeline.encode_prompt``.

    With ``clean_caption=False`` (``encode_prompt``'s default): each prompt is lower-cased and stripped,
    tokenized with ``padding="max_length"`` to ``max_length`` and truncated (special tokens added), and T5's
    last hidden state is taken with that attention mask. The pipelines' ``clean_caption=True`` (their
    ``__call__`` default) rewrites captions with ``bs4`` and ``ftfy`` (URLs, HTML, punctuation); difffeat does
    not depend on those packages, so prompts are used as given apart from the lower-casing: clean them
    beforehand to match a ``clean_caption=True`` generation.

    Args:
        pipeline_dir: a PixArt pipeline folder with ``text_encoder`` and ``tokenizer``.
        max_length: tokens per prompt (:func:`max_sequence_length`).

    Returns:
        prompts → ``{"encoder_hidden_states": (B, max_length, D) float32, "encoder_attention_mask":
        (B, max_length) int64}``.
    """
    encoder, tokenizer = load_text_encoder(pipeline_dir)

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenize(tokenizer, [p.lower().strip() for p in prompts], max_length)
        hidden = encoder(tokens["input_ids"], attention_mask=tokens["attention_mask"])[0]
        return {"encoder_hidden_states": hidden.float(), "encoder_attention_mask": tokens["attention_mask"]}

    return encode


def pixart_config(sample_size: int, num_layers: int, heads: int, head_dim: int, caption_channels: int,
                  patch_size: int = 2, in_channels: int = 4, **extra: Any) -> dict[str, Any]:
    """A PixArt-shaped ``PixArtTransformer2DModel`` config (learned σ: ``out_channels = 2 · in_channels``).

    PixArt-α/Σ-XL-2: ``sample_size`` 128 (1024 px), 28 layers, 16 heads of 72, ``caption_channels`` 4096.
    """
    return {"sample_size": sample_size, "num_layers": num_layers, "num_attention_heads": heads,
            "attention_head_dim": head_dim, "in_channels": in_channels, "out_channels": 2 * in_channels,
            "patch_size": patch_size, "caption_channels": caption_channels, "cross_attention_dim": heads * head_dim,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, **extra}


@register_adapter
class PixArtBackbone(TextConditioned):
    """PixArt-α / PixArt-Σ: a DiT cross-attending to T5 tokens; taps are tokens on the patch grid.

    The condition dict holds ``encoder_hidden_states`` ``(B, L, caption_channels)`` and
    ``encoder_attention_mask`` ``(B, L)`` (1 = a real token), with ``L`` =
    :func:`max_sequence_length`: 120 for a ``PixArtAlphaPipeline`` folder, 300 for ``PixArtSigmaPipeline``
    (``model_index.json``'s ``_class_name``), 120 otherwise or as ``max_sequence_length`` says. The default
    condition is resolved as :class:`~difffeat.backbones.text.TextConditioned` says; from a pipeline folder
    it is the encoded empty prompt, the pipelines' default negative prompt ``""``. Without any of those the
    zero fallback has an all-zero mask: every text token masked alike, so cross-attention reads the mean
    of zero tokens (their projection's bias).

    Where the model uses additional conditions (``use_additional_conditions``; diffusers turns it on for
    ``sample_size`` 128, PixArt-α-1024), every forward passes ``resolution = (H, W)`` and
    ``aspect_ratio = H / W`` of its latents in pixels (latent size × the VAE factor, ×8 without a VAE), as
    ``PixArtAlphaPipeline`` does at the generated size (without its resolution binning: the image's own size).

    Taps are ``pos_embed`` (the patch tokens with their position embedding) and ``transformer_blocks.i``,
    ``(B, N, D)`` tokens on the ``sample_size / patch_size`` grid at the probe size, as for DiT.

    The model predicts a learned variance: its output has ``2·C`` channels, the first ``C`` being ε (the
    pipelines keep those, ``noise_pred.chunk(2, dim=1)[0]``); :meth:`denoise` returns the full output.

    Args:
        model: the diffusers ``PixArtTransformer2DModel``.
        schedule: its noise schedule (PixArt's: linear β from 1e-4 to 0.02, T = 1000).
        max_sequence_length: T5 tokens per prompt; default from the pipeline folder (see above).
        **kwargs: see :class:`~difffeat.backbones.text.TextConditioned` (``condition``, ``null_embedding``,
            ``pipeline_dir``, ``vae``, ``name``).
    """

    model_class = "PixArtTransformer2DModel"
    default_scheduler = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}  # noqa: RUF012
    condition_keys = ("encoder_hidden_states", "encoder_attention_mask")

    def __init__(self, model: nn.Module, schedule: Any, max_sequence_length: int | None = None,
                 **kwargs: Any) -> None:
        self._max_sequence_length = max_sequence_length  # read while the default condition is resolved
        super().__init__(model, schedule, **kwargs)

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt (see the class docstring)."""
        if self._max_sequence_length is not None:
            return int(self._max_sequence_length)
        return max_sequence_length(self.pipeline_dir)

    @property
    def text_width(self) -> int:
        """Width of the text tokens the model takes (``caption_channels``, else the transformer's width)."""
        cfg = self.model.config
        channels = cfg.caption_channels
        return int(channels if channels is not None else cfg.num_attention_heads * cfg.attention_head_dim)

    def null_shapes(self) -> dict[str, tuple[int, ...]]:
        """Zeros of ``max_sequence_length`` tokens of :attr:`text_width`, and an all-zero mask."""
        length = self.max_sequence_length
        return {"encoder_hidden_states": (1, length, self.text_width), "encoder_attention_mask": (1, length)}

    def check_condition(self, key: str, value: torch.Tensor) -> None:
        """Shape check (the mask is ``(B, L)`` for any ``L``).

        Raises:
            ValueError: a tensor of the wrong rank or width.
        """
        if key == "encoder_attention_mask":
            if value.ndim != 2:
                raise ValueError(f"condition 'encoder_attention_mask' must have shape (B, L), got {tuple(value.shape)}")
            return
        super().check_condition(key, value)

    def load_prompt_encoder(self) -> PromptEncoder:
        """T5 with the attention mask (:func:`encode_t5_prompts`)."""
        return encode_t5_prompts(self.pipeline_dir, self.max_sequence_length)

    def condition_spec(self) -> dict[str, Any]:
        """Digests of the default condition and the tokens per prompt."""
        return {**super().condition_spec(), "max_sequence_length": self.max_sequence_length}

    # ----------------------------------------------------------------- taps and forward
    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (8 without a VAE, as the PixArt pipelines assume)."""
        if self.vae is None:
            return DEFAULT_VAE_FACTOR
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def tap_names(self) -> list[str]:
        """``pos_embed`` (the embedded patch tokens) and every transformer block, ``transformer_blocks.i``."""
        return ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The square patch grid of the latent, ``sample_size // patch_size`` per side."""
        side = self.latent_size // self.model.config.patch_size
        return side, side

    def added_cond_kwargs(self, x_t: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``resolution`` ``(B, 2)`` and ``aspect_ratio`` ``(B, 1)`` in pixels where the model uses them, else None."""
        if not getattr(self.model, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        h, w = (int(s) * self.vae_factor for s in x_t.shape[-2:])
        b = x_t.shape[0]
        return {"resolution": torch.tensor([[h, w]], dtype=x_t.dtype, device=x_t.device).expand(b, 2),
                "aspect_ratio": torch.tensor([[h / w]], dtype=x_t.dtype, device=x_t.device).expand(b, 1)}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The transformer's output at ``t`` (``2·C`` channels: ε, then the variance interpolation).

        Raises:
            ValueError: a condition whose batch is neither 1 nor that of ``x_t``.
        """
        c = self.condition(cond, x_t.shape[0], x_t.dtype, x_t.device)
        return self.model(x_t, encoder_hidden_states=c["encoder_hidden_states"], timestep=t,
                          encoder_attention_mask=c["encoder_attention_mask"],
                          added_cond_kwargs=self.added_cond_kwargs(x_t)).sample
