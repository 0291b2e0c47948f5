"""The RAE pipeline's networks as backbones: a DiT with a wide DDT head, and the frozen representation encoder.

* :class:`DiTDHTransformer2DModel` is DiT^DH of *Diffusion Transformers with Representation Autoencoders*:
  a DiT (diffusers' ``PatchEmbed`` and adaLN-Zero ``BasicTransformerBlock``, named as in
  ``DiTTransformer2DModel``) whose last tokens ``z`` condition a shallow head *wider than the latent's
  channel count*. The head embeds the noisy input again, runs ``head_num_layers`` transformer blocks whose
  adaLN-Zero shift / scale / gate are computed *per token* from ``s = SiLU(z + c)`` (``c`` the timestep
  and class embedding), and a per-token modulated final layer predicts the velocity. With
  ``head_num_layers = 0`` it is a plain DiT (final layer modulated by ``c``), the narrow baseline.
  The paper's head is 2 blocks of width 2048 on a 1152-wide DiT-XL; the registered digits sizes are
  CPU-scaled (see :func:`dit_dh_digits`).
* :class:`DiTDHBackbone` taps ``pos_embed``, ``transformer_blocks.i``, ``head_embed`` and ``head_blocks.j``
  (tokens). With an attached RAE (``rae/`` in its pipeline folder), images in ``[-1, 1]`` are encoded to
  RAE latents first, as a VAE backbone encodes with its VAE.
* :class:`RAEEncoderBackbone` taps the frozen encoder of a RAE folder: ``latent`` (the normalised
  ``(B, C, h, w)`` latent) and every encoder layer (its patch tokens; CLS and register tokens removed).
  A representation encoder has no timestep: ``t = 0`` reads the clean image; another ``t`` reads the
  image noised by the flow interpolant at that level.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from difffeat.backbones.base import LOAD_KWARGS, Backbone, _schedule, check_images
from difffeat.backbones.registry import register_adapter, register_backbone

__all__ = ["DIGITS_DIT_DH", "DiTDHBackbone", "DiTDHTransformer2DModel", "RAEEncoderBackbone", "TokenAdaLNBlock",
           "dit_dh_config"]

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}


class TokenAdaLNBlock(nn.Module):
    """A transformer block with adaLN-Zero modulation from a *per-token* condition ``(B, N, cond_dim)``.

    Attention and MLP are diffusers' ``Attention`` and ``FeedForward``; the modulation is zero-initialised,
    so the block starts as the identity (adaLN-Zero).
    """

    def __init__(self, dim: int, cond_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate")
        self.modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, N, dim)`` modulated token by token by ``cond`` ``(B, N, cond_dim)``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.ff(self.norm2(x) * (1 + scale2) + shift2)


class _FinalLayer(nn.Module):
    """Per-token modulated LayerNorm and linear projection to patch pixels (zero-initialised output)."""

    def __init__(self, dim: int, cond_dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, out)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return self.proj(self.norm(x) * (1 + scale) + shift)


class DiTDHTransformer2DModel(ModelMixin, ConfigMixin):
    """DiT with a wide, shallow DDT head (DiT^DH); ``head_num_layers = 0`` is a plain DiT.

    Args:
        sample_size: latent (or image) side.
        patch_size: patch side of both the DiT and the head.
        in_channels: latent channels.
        out_channels: predicted channels (default ``in_channels``).
        num_layers: DiT blocks.
        num_attention_heads: DiT heads.
        attention_head_dim: DiT head width (DiT width = heads × head width).
        head_num_layers: DDT head blocks (0: no head).
        head_num_attention_heads: head heads.
        head_attention_head_dim: head head width (the head's width should exceed ``in_channels · p²``).
        num_embeds_ada_norm: classes (the null class is this index).
    """

    @register_to_config
    def __init__(self, sample_size: int = 8, patch_size: int = 1, in_channels: int = 128,
                 out_channels: int | None = None, num_layers: int = 4, num_attention_heads: int = 4,
                 attention_head_dim: int = 32, head_num_layers: int = 2, head_num_attention_heads: int = 4,
                 head_attention_head_dim: int = 64, num_embeds_ada_norm: int = 10) -> None:
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels
        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=dim)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(dim, num_attention_heads, attention_head_dim, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=True,
                                  norm_type="ada_norm_zero", norm_elementwise_affine=False)
            for _ in range(num_layers)])
        self.time_embed = CombinedTimestepLabelEmbeddings(num_embeds_ada_norm, dim)
        out = patch_size * patch_size * self.out_channels
        if head_num_layers > 0:
            head_dim = head_num_attention_heads * head_attention_head_dim
            self.head_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                         in_channels=in_channels, embed_dim=head_dim)
            self.head_blocks = nn.ModuleList([TokenAdaLNBlock(head_dim, dim, head_num_attention_heads,
                                                              head_attention_head_dim)
                                              for _ in range(head_num_layers)])
            self.final_layer = _FinalLayer(head_dim, dim, out)
        else:
            self.head_embed, self.head_blocks = None, nn.ModuleList()
            self.final_layer = _FinalLayer(dim, dim, out)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_dict: bool = True) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Velocity (or noise) prediction ``(B, out_channels, H, W)`` for ``hidden_states`` at ``timestep``.

        ``class_labels`` default to the null class ``num_embeds_ada_norm``.
        """
        cfg = self.config
        b, _, height, width = hidden_states.shape
        if class_labels is None:
            class_labels = torch.full((b,), cfg.num_embeds_ada_norm, dtype=torch.long, device=hidden_states.device)
        timestep = torch.as_tensor(timestep, device=hidden_states.device).expand(b)
        h = self.pos_embed(hidden_states)
        for block in self.transformer_blocks:
            h = block(h, timestep=timestep, class_labels=class_labels)
        c = self.time_embed(timestep, class_labels, hidden_dtype=h.dtype)[:, None]  # (B, 1, D)
        if self.head_embed is not None:
            cond = F.silu(h + c)  # the DiT's tokens condition the head, token by token
            x = self.head_embed(hidden_states)
            for block in self.head_blocks:
                x = block(x, cond)
        else:
            cond, x = F.silu(c).expand_as(h), h
        out = self.final_layer(x, cond)
        p, c_out = cfg.patch_size, self.out_channels
        gh, gw = height // p, width // p
        out = out.reshape(b, gh, gw, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(b, c_out, gh * p, gw * p)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


@register_adapter
class DiTDHBackbone(Backbone):
    """A DiT^DH (or plain DiT) in pixel space or, with a RAE attached, in RAE latent space.

    Args:
        model: the :class:`DiTDHTransformer2DModel`.
        schedule: its flow schedule (RAE pipelines: the dimension-dependent shift ``α``).
        rae: the :class:`~difffeat.rae.RAE` whose latents the model denoises (frozen), or ``None``.
        class_label: the class conditioned on (default: the null class).
        **kwargs: see :class:`Backbone`.

    Raises:
        ValueError: a RAE whose latent shape is not the model's input, or a class label out of range.
    """

    model_class = "DiTDHTransformer2DModel"
    default_scheduler = FLOW

    def __init__(self, model: nn.Module, schedule: Any, rae: nn.Module | None = None, class_label: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, schedule, **kwargs)
        cfg = model.config
        self.class_label = cfg.num_embeds_ada_norm if class_label is None else int(class_label)
        if not 0 <= self.class_label <= cfg.num_embeds_ada_norm:
            raise ValueError(f"class_label {class_label} out of range [0, {cfg.num_embeds_ada_norm}]")
        self.rae = rae
        if rae is not None:
            want = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
            if tuple(rae.latent_shape) != want:
                raise ValueError(f"the RAE gives latents {tuple(rae.latent_shape)}, but the DiT takes {want}")
            rae.requires_grad_(False).eval()
            self.inputs = "images"

    @classmethod
    def diffusers_class(cls) -> type[nn.Module]:
        """:class:`DiTDHTransformer2DModel` (a diffusers ``ModelMixin`` defined here)."""
        return DiTDHTransformer2DModel

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, scheduler: Any = None, rae: nn.Module | None = None,
                        pipeline_dir: str | Path | None = None, **kwargs: Any) -> DiTDHBackbone:
        """Loads the model, and the pipeline's ``rae/`` folder when there is one."""
        model = DiTDHTransformer2DModel.from_pretrained(model_dir, **LOAD_KWARGS)
        if rae is None and pipeline_dir is not None and (Path(pipeline_dir) / "rae").is_dir():
            from difffeat.rae import RAE

            rae = RAE.from_pretrained(Path(pipeline_dir) / "rae")
        return cls(model, _schedule(scheduler, cls.default_scheduler), rae=rae, pipeline_dir=pipeline_dir, **kwargs)

    def train(self, mode: bool = True) -> DiTDHBackbone:
        """Train mode for the denoiser; an attached RAE stays frozen in eval mode."""
        super().train(mode)
        if self.rae is not None:
            self.rae.eval()
        return self

    def condition_spec(self) -> dict[str, Any]:
        """The class label conditioned on."""
        return {"class_label": self.class_label}

    def tap_names(self) -> list[str]:
        """``pos_embed``, ``transformer_blocks.i``, and with a head ``head_embed`` and ``head_blocks.j``."""
        names = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]
        if self.model.head_embed is not None:
            names += ["head_embed"] + [f"head_blocks.{j}" for j in range(len(self.model.head_blocks))]
        return names

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The square patch grid, ``sample_size // patch_size`` per side."""
        side = self.latent_size // self.model.config.patch_size
        return side, side

    @property
    def image_channels(self) -> int:
        """Channels of the images the user passes (the RAE's, or the model's in pixel space)."""
        return self.rae.image_channels if self.rae is not None else self.latent_channels

    @property
    def image_size(self) -> int:
        """Image side (the RAE's decoded size, or the model's)."""
        return self.rae.image_size[0] if self.rae is not None else self.latent_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` to the model's input: RAE latents (eval mode, noise-free), or the images."""
        if self.rae is None:
            return super().encode(images)
        check_images(images, self.image_channels)
        return self.rae.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space samples to images in ``[-1, 1]`` (through the RAE decoder where there is one)."""
        return latents if self.rae is None else self.rae.decode(latents)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The prediction at ``t`` for class labels ``cond`` (default :attr:`class_label`)."""
        labels = cond if cond is not None else torch.full(t.shape, self.class_label, dtype=torch.long, device=t.device)
        return self.model(x_t, t, class_labels=labels).sample


def _layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's list of transformer layers (transformers' ``layer`` / ``layers``, timm's ``blocks``)."""
    for name, module in encoder.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) and last in ("layer", "layers", "blocks"):
            return name, module
    raise ValueError(f"no list of transformer layers found in {type(encoder).__name__}")


#: prefix tokens ahead of the patch tokens in each AutoencoderRAE encoder's layers (CLS, registers)
_PREFIX = {"mae": 1, "dinov2": 5, "siglip2": 0}


@register_adapter
class RAEEncoderBackbone(Backbone):
    """The frozen representation encoder of a RAE, tapped like any backbone.

    Taps: ``latent`` (the normalised RAE latent, a ``(B, C, h, w)`` map) and
    ``autoencoder.encoder.<layers>.i`` (each layer's patch tokens ``(B, h·w, D)``; CLS and registers are
    dropped by :meth:`read_output`). The schedule is the plain flow interpolant; ``t = 0`` is the clean image.
    Feature probing uses a square input, so non-square timm encoders are encoded but not tapped.

    Args:
        model: a :class:`~difffeat.rae.RAE`.
        schedule: the noise applied to the input image at a requested ``t`` (default flow, shift 1).
        **kwargs: see :class:`Backbone`.
    """

    model_class = "AutoencoderRAE"
    default_scheduler = FLOW

    def __init__(self, model: nn.Module, schedule: Any = None, **kwargs: Any) -> None:
        super().__init__(model, _schedule(schedule, self.default_scheduler), **kwargs)
        model.requires_grad_(False).eval()
        ae = model.autoencoder
        # a timm encoder says how many prefix tokens it has; AutoencoderRAE's are fixed per encoder type
        self.prefix = int(ae.num_prefix_tokens) if hasattr(ae, "num_prefix_tokens") else _PREFIX[ae.config.encoder_type]
        path, layers = _layer_list(ae.encoder)
        self._layers = [f"autoencoder.encoder.{path}.{i}" for i in range(len(layers))]
        self.inputs = "images"

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, scheduler: Any = None, **kwargs: Any) -> RAEEncoderBackbone:
        """Loads a RAE folder (``AutoencoderRAE`` or ``TimmAutoencoderRAE``)."""
        from difffeat.rae import RAE

        kwargs.pop("pipeline_dir", None)
        return cls(RAE.from_pretrained(model_dir), scheduler, **kwargs)

    def train(self, mode: bool = True) -> RAEEncoderBackbone:
        """Frozen: stays in eval mode."""
        return super().train(False)

    def tap_names(self) -> list[str]:
        """``latent`` and every encoder layer."""
        return ["latent", *self._layers]

    def read_output(self, name: str, output: Any) -> torch.Tensor:
        """A layer's hidden states without the prefix (CLS / register) tokens; the latent as is."""
        tensor = super().read_output(name, output)
        return tensor[:, self.prefix:] if name != "latent" and tensor.ndim == 3 else tensor

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The encoder's patch grid."""
        return tuple(self.model.grid)

    @property
    def latent_channels(self) -> int:
        """The input images' channels (the encoder reads images)."""
        return self.model.image_channels

    @property
    def latent_size(self) -> int:
        """The input image side."""
        return int(self.model.image_size[0])

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The RAE latent of (possibly noised) images; the encoder takes no timestep."""
        return self.model.encode(x_t)


@register_adapter
class TimmRAEEncoderBackbone(RAEEncoderBackbone):
    """:class:`RAEEncoderBackbone` for a :class:`~difffeat.rae.TimmAutoencoderRAE` folder."""

    model_class = "TimmAutoencoderRAE"


def dit_dh_config(latent_shape: tuple[int, int, int], width: int, layers: int, head_width: int, head_layers: int,
                  head_dim: int = 32, patch_size: int = 1) -> dict[str, Any]:
    """A :class:`DiTDHTransformer2DModel` config for a square latent ``(C, s, s)``.

    ``width`` / ``head_width`` are split in heads of ``head_dim``; ``head_layers = 0`` is a plain DiT.
    """
    c, s, s2 = latent_shape
    if s != s2:
        raise ValueError(f"DiT^DH takes square latents, got {latent_shape}")
    return {"sample_size": s, "patch_size": patch_size, "in_channels": c, "num_layers": layers,
            "num_attention_heads": width // head_dim, "attention_head_dim": head_dim, "head_num_layers": head_layers,
            "head_num_attention_heads": max(head_width // head_dim, 1), "head_attention_head_dim": head_dim}


@register_backbone
def dit_dh_tiny(**kwargs: Any) -> Backbone:
    """A 1-block DiT with a 1-block, 64-wide head on 8×4×4 latents, for unit tests."""
    return DiTDHBackbone.from_config(dit_dh_config((8, 4, 4), 32, 1, 64, 1, head_dim=16), name="dit-dh-tiny",
                                     **kwargs)


#: DiT^DH sizes for the digits RAE latent ``128 × 8 × 8`` (patch 1, 64 tokens): 4 DiT blocks of width 96 and a
#: 1-block head of width 192, wider than the latent's 128 channels (the paper: 2 blocks of 2048 on 768-channel
#: DINOv2 latents behind a 1152-wide DiT-XL). CPU-scaled: one training step of batch 32 costs about a second.
DIGITS_DIT_DH = dit_dh_config((128, 8, 8), 96, 4, 192, 1)


@register_backbone
def dit_dh_digits(**kwargs: Any) -> Backbone:
    """DiT^DH on the digits RAE latent (:data:`DIGITS_DIT_DH`), flow schedule shifted by ``α = √(8192 / 4096)``."""
    kwargs.setdefault("scheduler", {**FLOW, "shift": math.sqrt(128 * 64 / 4096)})
    return DiTDHBackbone.from_config(DIGITS_DIT_DH, name="dit-dh-digits", **kwargs)


@register_backbone
def dit_dh_digits_narrow(**kwargs: Any) -> Backbone:
    """The plain, narrow DiT baseline of ``dit-dh-digits``: width 96, 7 blocks, no head (1.50 M parameters, as it)."""
    kwargs.setdefault("scheduler", {**FLOW, "shift": math.sqrt(128 * 64 / 4096)})
    return DiTDHBackbone.from_config(dit_dh_config((128, 8, 8), 96, 7, 0, 0), name="dit-dh-digits-narrow", **kwargs)


@register_backbone
def dit_dh_digits_pixel(**kwargs: Any) -> Backbone:
    """``dit-dh-digits``' sizes in pixel space: 16×16 grey digits, patch 2 (the same 64 tokens), no shift."""
    return DiTDHBackbone.from_config(dit_dh_config((1, 16, 16), 96, 4, 192, 1, patch_size=2),
                                     name="dit-dh-digits-pixel", **kwargs)
