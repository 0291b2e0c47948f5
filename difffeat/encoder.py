"""``DiffusionEncoder``: a diffusion backbone as a multi-scale encoder that dense decoders plug into.

It taps chosen layers at one timestep and returns a list of feature maps ordered by stride, with the
encoder contract of ``segmentation_models_pytorch`` (``out_channels`` starting with the input's
channels at stride 1, then one entry per map; ``output_stride``) and timm's ``feature_info``
(``channels()``, ``reduction()``, ``module_name()``). So SMP's decoders (``UnetDecoder``,
``FPNDecoder``, …) are built from ``encoder.out_channels`` unchanged, and a torchvision
``FeaturePyramidNetwork`` takes ``encoder.out_channels[1:]``.

Strides are in *image* pixels: a latent backbone's tap stride times the VAE's downsampling. SMP's
decoders need each map at twice the previous one's stride (U-Net: 2, 4, 8, …; FPN: 4, 8, 16, 32), which a
diffusion U-Net's taps rarely give (its decoder blocks sit at 1/8 … 1/1): ``output_strides`` resizes each
tap (area averaging down, bilinear up) to the stride a decoder expects.

Noise is seeded by image content by default (``noise="content"``): the encoder is then a deterministic
function of its input, whatever batch the image is in, which is what a training loop over shuffled
batches needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models._features import FeatureInfo as TimmFeatureInfo
from torch import nn

from difffeat.backbones.base import Backbone
from difffeat.extract import DEFAULT_BATCH_SIZE, FeatureExtractor
from difffeat.readout import Identity

__all__ = ["DiffusionEncoder"]


class DiffusionEncoder(nn.Module):
    """Chosen taps of a diffusion backbone at one timestep, as a stride-ordered list of maps.

    Args:
        backbone: a :class:`~difffeat.backbones.Backbone`, or a name/folder for ``create_backbone``.
        layers: tap names (any order; the maps are returned by increasing stride).
        timestep: the DDPM index the image is noised to (0 = least noise).
        output_strides: resize the taps (sorted by stride) to these image strides, one per tap,
            increasing; ``None`` keeps the taps' own strides, which must then be distinct.
        finetune: train the backbone with the decoder (``False``: frozen, run under inference mode).
        seed: noise seed.
        noise: noise key rule (``"content"`` by default; see :mod:`difffeat.noise`).
        input_range: value range of the input images if not ``[-1, 1]``.
        batch_size: extractor rows per forward.
        pad_rows: pad CPU forwards to fixed rows (see :class:`~difffeat.extract.FeatureExtractor`); ``False``
            for a frozen encoder computed online under a trained decoder, where batch-independent bits buy
            nothing and padding a small training batch to 32 rows costs up to 8×.
        backbone_kwargs: extra ``create_backbone`` arguments when ``backbone`` is a name.

    Raises:
        ValueError: taps of equal stride without ``output_strides``, or ``output_strides`` of the wrong
            length or order.
    """

    def __init__(self, backbone: Backbone | str, layers: Sequence[str], timestep: int,
                 output_strides: Sequence[int] | None = None, finetune: bool = False, seed: int = 0,
                 noise: str = "content", input_range: tuple[float, float] | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, backbone_kwargs: dict[str, Any] | None = None,
                 pad_rows: bool = True) -> None:
        super().__init__()
        if isinstance(backbone, str):
            from difffeat.backbones import create_backbone

            backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        self.extractor = FeatureExtractor(backbone, layers, [timestep], seed=seed, readout=Identity(),
                                          batch_size=batch_size, noise=noise, input_range=input_range,
                                          pad_rows=pad_rows)
        self.timestep, self.finetune = self.extractor.timesteps[0], finetune
        if finetune:
            backbone.requires_grad_(True)
        infos = backbone.feature_info
        scale = backbone.image_size // backbone.latent_size  # the VAE's downsampling (1 in pixel space)
        own = {n: self._tap_stride(infos[n], backbone) * scale for n in self.extractor.layers}
        self.layers = sorted(self.extractor.layers, key=lambda n: (own[n], infos[n].order))
        if output_strides is None:
            strides = [own[n] for n in self.layers]
            if len(set(strides)) != len(strides):
                raise ValueError(f"taps {self.layers} have strides {strides}: two maps at one stride; pick taps "
                                 f"of distinct strides or give output_strides")
        else:
            strides = [int(s) for s in output_strides]
            if len(strides) != len(self.layers) or strides != sorted(set(strides)) or strides[0] < 1:
                raise ValueError(f"output_strides must give one increasing stride >= 1 per tap "
                                 f"({len(self.layers)} taps: {self.layers}), got {list(output_strides)}")
        self.strides = strides
        self.image_channels = backbone.image_channels
        #: SMP's encoder contract: the input at stride 1, then each map
        self.out_channels = (self.image_channels, *(infos[n].channels for n in self.layers))
        self.output_stride = strides[-1]
        self.feature_info = TimmFeatureInfo(
            [{"num_chs": infos[n].channels, "reduction": s, "module": n} for n, s in zip(self.layers, strides,
                                                                                    strict=True)],
            out_indices=tuple(range(len(self.layers))))

    @staticmethod
    def _tap_stride(info: Any, backbone: Backbone) -> int:
        if info.stride is not None:
            return info.stride
        return backbone.latent_size // info.grid[0]  # tokens: folded onto their patch grid

    @property
    def backbone(self) -> Backbone:
        """The wrapped backbone."""
        return self.extractor.backbone

    def train(self, mode: bool = True) -> DiffusionEncoder:
        """A frozen backbone stays in eval mode; a fine-tuned one follows ``mode``."""
        super().train(mode)
        self.extractor.backbone.train(mode and self.finetune)
        return self

    def forward(self, images: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``[images, map at the smallest stride, …, map at the largest]``.

        Args:
            images: ``(B, C, H, W)`` with ``H`` and ``W`` divisible by ``output_stride``.
            indices: dataset indices (used only under the ``"index"`` noise rule).

        Returns:
            The input (as SMP encoders return it first), then one ``(B, C_i, H / s_i, W / s_i)`` map per tap.
        """
        if self.finetune:
            feats = self.extractor.features(images, indices)
        else:
            feats = {k: v.clone() for k, v in self.extractor(images, indices).items()}  # leave inference mode
        h, w = images.shape[-2:]
        if h % self.output_stride or w % self.output_stride:
            raise ValueError(f"image size {h}x{w} is not divisible by the encoder's output stride "
                             f"{self.output_stride}")
        out = [images.float() if not images.is_floating_point() else images]
        for layer, stride in zip(self.layers, self.strides, strict=True):
            m = feats[(layer, self.timestep)]
            size = (h // stride, w // stride)
            if tuple(m.shape[-2:]) != size:
                shrink = m.shape[-2] > size[0]
                m = F.interpolate(m, size=size, mode="area") if shrink else F.interpolate(
                    m, size=size, mode="bilinear", align_corners=False)
            out.append(m)
        return out
