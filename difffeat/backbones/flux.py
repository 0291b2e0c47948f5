"""Adapter for diffusers ``FluxTransformer2DModel`` (FLUX.1-dev / -schnell).

Flux is an MMDiT on *packed* latents: each 2×2 patch of the ``C``-channel latent becomes one token of
``4·C`` values (``FluxPipeline._pack_latents``), positioned by rotary embeddings of 3-axis ids (``img_ids``
``(0, row, col)`` per patch, ``txt_ids`` all zeros). Double-stream blocks (``transformer_blocks``) keep the
text and image tokens apart around a joint attention; single-stream blocks (``single_transformer_blocks``)
process them concatenated, text first, and (diffusers 0.42) return them split again as ``(text, image)``.
The condition is T5's last hidden state (``encoder_hidden_states``) and CLIP's pooled output
(``pooled_projections``), encoded exactly as ``FluxPipeline.encode_prompt`` does (:func:`encode_flux_prompts`);
FLUX.1-dev, guidance-distilled, also embeds a guidance scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.backbones.registry import register_adapter
from difffeat.backbones.sd3 import TextStreamTaps
from difffeat.backbones.text import PromptEncoder, TextConditioned, load_text_encoder, tokenize
from difffeat.noise import FlowSchedule

__all__ = ["FluxBackbone", "encode_flux_prompts", "flux_config", "latent_image_ids", "pack_latents",
           "unpack_latents"]

#: latent cells per side of the Flux pipeline's default image (``default_sample_size`` 128: 1024 px)
DEFAULT_LATENT_SIZE = 128

#: FLUX.1-dev's pipeline default ``guidance_scale``
DEFAULT_GUIDANCE = 3.5


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents to ``(B, H/2 · W/2, 4·C)`` tokens, the layout of ``FluxPipeline._pack_latents``.

    Token ``(i, j)`` (row-major over the ``H/2 × W/2`` patch grid) holds its 2×2 patch channel-major:
    ``c · 4 + 2 · dy + dx``.
    """
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``(B, H/2 · W/2, 4·C)`` to ``(B, C, H, W)`` (``_unpack_latents``)."""
    b, _n, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(h · w, 3)`` ids ``(0, row, col)`` of a packed ``h × w`` patch grid (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def encode_flux_prompts(pipeline_dir: str | Path, max_sequence_length: int) -> PromptEncoder:
    """Flux's prompt encoding, as ``FluxPipeline.encode_prompt`` (``prompt_2`` defaulting to ``prompt``).

    CLIP (``text_encoder``, a ``CLIPTextModel``) gets the prompt padded to its tokenizer's
    ``model_max_length`` and truncated, without an attention mask; its ``pooler_output`` is
    ``pooled_projections``. T5 (``text_encoder_2``) gets it padded to ``max_sequence_length`` and truncated
    (special tokens added), without a mask; its last hidden state is ``encoder_hidden_states``.

    Args:
        pipeline_dir: a Flux pipeline folder.
        max_sequence_length: T5 tokens per prompt (the pipeline's default 512).

    Returns:
        prompts → ``{"encoder_hidden_states": (B, max_sequence_length, D), "pooled_projections": (B, P)}``
        in float32.

    Raises:
        FileNotFoundError: an encoder or a tokenizer is missing (named).
    """
    clip, clip_tokenizer = load_text_encoder(pipeline_dir, "text_encoder", "tokenizer")
    t5, t5_tokenizer = load_text_encoder(pipeline_dir, "text_encoder_2", "tokenizer_2")
    clip_length = int(clip_tokenizer.model_max_length)

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        pooled = clip(tokenize(clip_tokenizer, prompts, clip_length)["input_ids"], output_hidden_states=False)
        hidden = t5(tokenize(t5_tokenizer, prompts, max_sequence_length)["input_ids"], output_hidden_states=False)
        return {"encoder_hidden_states": hidden[0].float(), "pooled_projections": pooled.pooler_output.float()}

    return encode


def flux_config(num_layers: int, num_single_layers: int, heads: int, head_dim: int, joint_attention_dim: int,
                pooled_projection_dim: int, axes_dims_rope: tuple[int, int, int], latent_channels: int = 16,
                guidance_embeds: bool = True) -> dict[str, Any]:
    """A Flux-shaped ``FluxTransformer2DModel`` config on packed latents (``in_channels = 4 · latent_channels``).

    FLUX.1-dev: 19 double and 38 single blocks, 24 heads of 128, ``joint_attention_dim`` 4096 (T5-XXL),
    ``pooled_projection_dim`` 768 (CLIP-L), ``axes_dims_rope`` (16, 56, 56) (summing to the head width),
    16 latent channels, guidance embedding on (off for FLUX.1-schnell).
    """
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to the head width {head_dim}")
    return {"patch_size": 1, "in_channels": 4 * latent_channels, "num_layers": num_layers,
            "num_single_layers": num_single_layers, "attention_head_dim": head_dim, "num_attention_heads": heads,
            "joint_attention_dim": joint_attention_dim, "pooled_projection_dim": pooled_projection_dim,
            "guidance_embeds": guidance_embeds, "axes_dims_rope": tuple(axes_dims_rope)}


@register_adapter
class FluxBackbone(TextStreamTaps, TextConditioned):
    """Flux: packed 2×2 latents, double- and single-stream blocks; taps are image tokens on the patch grid.

    :meth:`denoise` takes and returns ``(B, C, H, W)`` latents like every adapter: it packs them
    (:func:`pack_latents`), builds ``img_ids`` for their ``H/2 × W/2`` grid and zero ``txt_ids`` for the
    text length (:func:`latent_image_ids`, as ``FluxPipeline.prepare_latents`` / ``encode_prompt``), calls the
    transformer as the pipeline's denoising loop does and unpacks the prediction (:func:`unpack_latents`).

    The condition dict holds ``encoder_hidden_states`` ``(B, max_sequence_length, joint_attention_dim)`` and
    ``pooled_projections`` ``(B, pooled_projection_dim)`` (:func:`encode_flux_prompts`); the default is the
    encoded empty prompt from a pipeline folder (Flux has no negative prompt by default; ``""`` is what a
    prompt-free image is read with), else zeros, with a warning.

    Timesteps: the extractor passes ``σ · T`` (``T`` = 1000); the pipeline gives the transformer
    ``timestep / 1000`` = ``σ``, and so does :meth:`denoise` (dividing by the schedule's ``T``, which is
    1000 for every Flux checkpoint). The schedule's dynamic shift (``use_dynamic_shifting``, FLUX.1-dev) is
    resolved once, at construction, for the image token count at :attr:`latent_size`
    (:meth:`~difffeat.noise.FlowSchedule.for_sequence_length`, the pipeline's ``calculate_shift``): pass the
    ``latent_size`` of the images you read so their noise levels are those the pipeline samples at.

    Where the model has a guidance embedding (``guidance_embeds``, FLUX.1-dev), every call passes
    ``guidance`` (default 3.5, the pipeline's ``guidance_scale`` default), recorded in :meth:`condition_spec`.

    Taps: ``x_embedder`` (the embedded packed tokens), ``transformer_blocks.i`` and
    ``single_transformer_blocks.i`` (image tokens) and their ``.text`` twins (text tokens; see
    :class:`~difffeat.backbones.sd3.TextStreamTaps`). A single-stream block that returns its tokens
    concatenated (text first, as diffusers releases before the ``(text, image)`` split did) is split at the
    text length of the running call. Image taps are ``(B, N, D)`` on the ``(H/2, W/2)`` grid.

    Args:
        model: the diffusers ``FluxTransformer2DModel``.
        schedule: its noise schedule (dynamic shift resolved as above).
        latent_size: latent cells per side of the images to read (default 128, the pipeline's 1024 px).
        guidance: the embedded guidance scale, for models with ``guidance_embeds``.
        max_sequence_length: T5 tokens per prompt (the pipeline's default 512).
        **kwargs: see :class:`~difffeat.backbones.text.TextConditioned` (``condition``, ``null_embedding``,
            ``pipeline_dir``, ``vae``, ``name``).

    Raises:
        ValueError: an odd ``latent_size`` (latents pack in 2×2 patches).
    """

    model_class = "FluxTransformer2DModel"
    default_scheduler = {  # noqa: RUF012 (FLUX.1-dev's scheduler_config.json)
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}
    condition_keys = ("encoder_hidden_states", "pooled_projections")
    joint_blocks = ("transformer_blocks", "single_transformer_blocks")
    output_streams = {"transformer_blocks": 1, "single_transformer_blocks": 1}  # noqa: RUF012 ((text, image))

    def __init__(self, model: nn.Module, schedule: Any, latent_size: int = DEFAULT_LATENT_SIZE,
                 guidance: float = DEFAULT_GUIDANCE, max_sequence_length: int = 512, **kwargs: Any) -> None:
        if int(latent_size) < 2 or int(latent_size) % 2:
            raise ValueError(f"latent_size must be even (2x2 patches are packed into tokens), got {latent_size}")
        self._latent_size = int(latent_size)
        self.max_sequence_length = int(max_sequence_length)  # read while the default condition is resolved
        self.guidance = float(guidance)
        self._text_tokens: int | None = None
        if isinstance(schedule, FlowSchedule):
            schedule = schedule.for_sequence_length((self._latent_size // 2) ** 2)
        super().__init__(model, schedule, **kwargs)

    # ----------------------------------------------------------------- sizes and conditions
    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent (``in_channels / 4``)."""
        return int(self.model.config.in_channels) // 4

    @property
    def latent_size(self) -> int:
        """Latent cells per side of the images read (the constructor's ``latent_size``)."""
        return self._latent_size

    @property
    def has_guidance(self) -> bool:
        """Whether the model embeds a guidance scale (``guidance_embeds``)."""
        return bool(self.model.config.guidance_embeds)

    def null_shapes(self) -> dict[str, tuple[int, ...]]:
        """Zeros of ``max_sequence_length`` tokens of ``joint_attention_dim``, and a zero pooled vector."""
        cfg = self.model.config
        return {"encoder_hidden_states": (1, self.max_sequence_length, int(cfg.joint_attention_dim)),
                "pooled_projections": (1, int(cfg.pooled_projection_dim))}

    def load_prompt_encoder(self) -> PromptEncoder:
        """CLIP's pooled output and T5's hidden states (:func:`encode_flux_prompts`)."""
        return encode_flux_prompts(self.pipeline_dir, self.max_sequence_length)

    def condition_spec(self) -> dict[str, Any]:
        """Digests of the default condition, the T5 tokens per prompt and the guidance scale (if embedded)."""
        spec = {**super().condition_spec(), "max_sequence_length": self.max_sequence_length}
        if self.has_guidance:
            spec["guidance"] = self.guidance
        return spec

    # ----------------------------------------------------------------- taps and forward
    def tap_names(self) -> list[str]:
        """``x_embedder``, every double-stream and every single-stream block (``.text`` taps come from the probe)."""
        return (["x_embedder"] + [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]
                + [f"single_transformer_blocks.{i}" for i in range(len(self.model.single_transformer_blocks))])

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The packed patch grid at the probe size, ``(latent_size / 2, latent_size / 2)``.

        Raises:
            ValueError: ``num_tokens`` does not fill it (text tokens, or a single block's text+image tokens).
        """
        side = self.latent_size // 2
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens do not fill the {side}x{side} packed patch grid")
        return side, side

    def _text_of(self, block: str, output: Any, strict: bool = True) -> torch.Tensor | None:
        if isinstance(output, torch.Tensor) and self._text_tokens is not None:  # concatenated (text, image)
            return output[:, : self._text_tokens]
        return super()._text_of(block, output, strict)

    def read_output(self, name: str, output: Any) -> torch.Tensor:
        """As :class:`~.sd3.TextStreamTaps`; a concatenated block output is split at the text length."""
        if isinstance(output, torch.Tensor) and self._text_tokens is not None and name in self._joint_block_names():
            return output[:, self._text_tokens:]
        return super().read_output(name, output)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The transformer's velocity prediction at ``t`` (``σ · T``), unpacked to ``(B, C, H, W)``.

        Raises:
            ValueError: odd latent sides, or a condition whose batch is neither 1 nor that of ``x_t``.
        """
        b, _c, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents must have even sides (2x2 patches are packed), got {h}x{w}")
        c = self.condition(cond, b, x_t.dtype, x_t.device)
        text = c["encoder_hidden_states"]
        guidance = (torch.full([1], self.guidance, device=x_t.device, dtype=torch.float32).expand(b)
                    if self.has_guidance else None)
        timestep = t.to(x_t.dtype).expand(b) / self.schedule.num_train_timesteps
        self._text_tokens = text.shape[1]
        out = self.model(hidden_states=pack_latents(x_t), timestep=timestep, guidance=guidance,
                         pooled_projections=c["pooled_projections"], encoder_hidden_states=text,
                         txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                         img_ids=latent_image_ids(h // 2, w // 2, x_t.device, x_t.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)
