"""Backbone adapters, their registry and small registered architectures.

Registered constructors only set arguments (timm style); they build *randomly initialised* models
from a diffusers config, for tests, benchmarks and for training the project's own small backbones.
Real checkpoints load through ``create_backbone(folder)``.
"""

from __future__ import annotations

from typing import Any

import torch

from difffeat.backbones.base import Backbone, FeatureInfo, check_images
from difffeat.backbones.dit import DiTBackbone
from difffeat.backbones.flux import FluxBackbone, flux_config
from difffeat.backbones.pixart import PixArtBackbone, pixart_config
from difffeat.backbones.rae import DiTDHBackbone, RAEEncoderBackbone
from difffeat.backbones.registry import (
    create_backbone,
    list_backbones,
    register_adapter,
    register_backbone,
    resolve_local,
)
from difffeat.backbones.sd3 import SD3Backbone, sd3_config
from difffeat.backbones.sdxl import SDXLBackbone, sdxl_unet_config
from difffeat.backbones.unet import UNet2DBackbone, UNet2DConditionBackbone

__all__ = [
    "DIGITS_DIT",
    "DIGITS_UNET",
    "Backbone",
    "DiTBackbone",
    "DiTDHBackbone",
    "FeatureInfo",
    "FluxBackbone",
    "PixArtBackbone",
    "RAEEncoderBackbone",
    "SD3Backbone",
    "SDXLBackbone",
    "UNet2DBackbone",
    "UNet2DConditionBackbone",
    "check_images",
    "create_backbone",
    "list_backbones",
    "register_adapter",
    "register_backbone",
    "resolve_local",
]

#: The digits backbone of the main job: a 16×16 grey-scale DDPM U-Net, about 1.1 M parameters.
DIGITS_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}


@register_backbone
def unet2d_digits(**kwargs: Any) -> Backbone:
    """The main job's 16×16 grey-scale U-Net (random init; ``difffeat fit`` trains it)."""
    return UNet2DBackbone.from_config(DIGITS_UNET, name="unet2d-digits", **kwargs)


@register_backbone
def unet2d_tiny(**kwargs: Any) -> Backbone:
    """A 16×16 grey-scale U-Net small enough for unit tests."""
    config = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 8}
    return UNet2DBackbone.from_config(config, name="unet2d-tiny", **kwargs)


def sd_unet_config(block_out_channels: list[int], sample_size: int, cross_attention_dim: int,
                   layers_per_block: int = 2, heads: int = 8) -> dict[str, Any]:
    """A Stable-Diffusion-1.x-shaped ``UNet2DConditionModel`` config.

    Cross-attention in every block but the deepest down and the first up block, a cross-attention mid
    block, 4 latent channels.
    """
    n = len(block_out_channels)
    return {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
        "block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": heads,
        "norm_num_groups": min(32, block_out_channels[0]),
    }


@register_backbone
def sd_unet_tiny(**kwargs: Any) -> Backbone:
    """A Stable-Diffusion-shaped U-Net on 8×8×4 latents for unit tests."""
    return UNet2DConditionBackbone.from_config(sd_unet_config([16, 32], 8, 16, layers_per_block=1, heads=2),
                                               name="sd-unet-tiny", **kwargs)


@register_backbone
def sd_unet_small(**kwargs: Any) -> Backbone:
    """SD-1.x's layout (4 levels, 2 layers per block) at 1/5 width on 32×32 latents, for benchmarks."""
    return UNet2DConditionBackbone.from_config(sd_unet_config([64, 128, 256, 256], 32, 256),
                                               name="sd-unet-small", **kwargs)


@register_backbone
def dit_tiny(**kwargs: Any) -> Backbone:
    """A 4-block DiT on 8×8×4 latents with patch size 2 (a 4×4 token grid), 10 classes."""
    config = {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
              "num_layers": 4, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10,
              "norm_num_groups": 8}
    return DiTBackbone.from_config(config, name="dit-tiny", **kwargs)


#: A pixel-space DiT for 16×16 grey digits: patch 2 (an 8×8 token grid), 6 blocks of width 128, 10 classes
#: plus the null class; no learned variance (one output channel), as flow models predict only a velocity.
DIGITS_DIT: dict[str, Any] = {
    "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 1, "out_channels": 1,
    "num_layers": 6, "sample_size": 16, "patch_size": 2, "num_embeds_ada_norm": 10,
}


@register_backbone
def dit_digits(**kwargs: Any) -> Backbone:
    """The digits DiT (random init; ``difffeat fit`` trains it)."""
    return DiTBackbone.from_config(DIGITS_DIT, name="dit-digits", **kwargs)


@register_backbone
def sd_unet_scenes(**kwargs: Any) -> Backbone:
    """A U-Net of Stable Diffusion's kind in *pixel* space for the 64×64 RGB scene benchmark.

    A ``UNet2DConditionModel`` with cross-attention blocks, 3 channels in and out and no VAE: the
    CPU-sized stand-in for SD in the few-shot head. Attention runs only at 16×16 and 8×8: at 64×64 a
    KV-fused attention of a batch of episodes would need gigabytes on a CPU.
    """
    config = {"sample_size": 64, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64, 64, 96],
              "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 16,
              "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}
    kwargs.setdefault("encoder_hidden_states", torch.zeros(1, 1, 32))
    return UNet2DConditionBackbone.from_config(config, name="sd-unet-scenes", **kwargs)


@register_backbone
def sd_unet_scenes_attn2(**kwargs: Any) -> Backbone:
    """``sd-unet-scenes`` with attention at 1/2 resolution too: every level but the input level, as SD has.

    Self- and cross-attention at 32×32, 16×16 and 8×8 of a 64×64 scene, so KV fusion acts at the
    U-Net's fine grid as the few-shot reference does (``experiments/bench_fewshot_fusion.py`` measures
    what it costs on the CPU). Same widths as ``sd-unet-scenes``.
    """
    config = {"sample_size": 64, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64, 64, 96],
              "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 16,
              "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
              "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]}
    kwargs.setdefault("encoder_hidden_states", torch.zeros(1, 1, 32))
    return UNet2DConditionBackbone.from_config(config, name="sd-unet-scenes-attn2", **kwargs)


@register_backbone
def sdxl_unet_tiny(**kwargs: Any) -> Backbone:
    """An SDXL-shaped U-Net on 8×8×4 latents for unit tests: text width 32 (two 16-wide CLIPs), pooled 16."""
    config = sdxl_unet_config([8, 16], 8, 32, pooled_dim=16, addition_time_embed_dim=8, layers_per_block=1,
                              heads=2)
    return SDXLBackbone.from_config(config, name="sdxl-unet-tiny", **kwargs)


@register_backbone
def pixart_tiny(**kwargs: Any) -> Backbone:
    """A 2-block PixArt on 8×8×4 latents with patch size 2 (a 4×4 token grid), 32-wide T5 tokens."""
    return PixArtBackbone.from_config(pixart_config(8, 2, 2, 8, 32), name="pixart-tiny", **kwargs)


@register_backbone
def sd3_tiny(**kwargs: Any) -> Backbone:
    """An SD3-shaped MMDiT on 8×8×4 latents: 2 joint blocks, 2 heads of 8, patch 2 (a 4×4 token grid)."""
    return SD3Backbone.from_config(sd3_config(8, 2, 2, 8, 32, 16, in_channels=4, pos_embed_max_size=16),
                                   name="sd3-tiny", **kwargs)


@register_backbone
def flux_tiny(**kwargs: Any) -> Backbone:
    """A Flux-shaped transformer on 8×8×4 latents (a 4×4 packed grid): 1 double and 1 single block, guidance."""
    kwargs.setdefault("latent_size", 8)
    return FluxBackbone.from_config(flux_config(1, 1, 2, 8, 32, 16, (2, 2, 4), latent_channels=4),
                                    name="flux-tiny", **kwargs)
