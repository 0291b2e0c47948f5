"""Baselines for dichotomous image segmentation beside the DiffDIS-style model of :mod:`heads.dis`.

Both train on :class:`~difffeat.data.dis.DISDataModule` batches with the DiffDIS module's loss (SMP's soft
BCE + Dice on the mask logits: :func:`heads.dis.dis_loss` with no edge term) and are scored by the same
code (:class:`heads.dis.DISModule`: the DIS suite of :class:`~heads.dis_metrics.DISMetrics`, flip /
multi-scale test-time augmentation, :func:`heads.dis.predict_folder`).

* :class:`SMPSegmentationModule` — baseline (a): a ``segmentation_models_pytorch`` model (U-Net by
  default) on an **untrained** timm encoder (``tu-resnet18``, ``encoder_weights=None``): what the same
  data and step budget give without any pretraining.
* :class:`FrozenDiffusionSMPModule` — baseline (b): SMP's U-Net or FPN decoder on the **frozen**
  :class:`~difffeat.encoder.DiffusionEncoder` of a diffusion-pretrained U-Net, the way a practitioner
  first tries diffusion features with a standard decoder. Default taps of the scenes U-Net
  (``sd-unet-scenes``): its decoder path ``up_blocks.2`` / ``up_blocks.1`` / ``up_blocks.0`` /
  ``mid_block`` (strides 1, 2, 4, 8), resized to strides 2, 4, 8, 16, the pyramid both SMP decoders
  expect (the stride-1 map is averaged to stride 2: SMP's decoders take no stride-1 skip; the coarsest
  is pooled to 16 so the FPN gets its four levels). Timestep 50 of 1000 (little noise: the segmentation
  literature on DDPM features reads them at t ≈ 50–250; the lowest keeps thin structures visible).
  Frozen means frozen (the project's contract): the backbone has ``requires_grad_(False)``, stays in
  eval mode, runs under inference mode, is out of the optimizer and out of :meth:`state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from heads.base import FrozenPartState
from heads.dis import DISModule, dis_loss

__all__ = ["DECODERS", "FrozenDiffusionSMPModule", "SMPSegmentationModule"]

#: the frozen encoder's prefix in the module's state (left out of checkpoints)
_FROZEN = "encoder."


def _check_images(images: torch.Tensor, multiple: int) -> None:
    from difffeat.backbones.base import check_images

    check_images(images, 3, "DIS images")
    if images.shape[-1] % multiple or images.shape[-2] % multiple:
        raise ValueError(f"DIS images {tuple(images.shape)}: height and width must be multiples of {multiple} "
                         f"(the network's output stride); resize them first")


class _MaskLogitsModule(DISModule):
    """A DIS module whose network maps images to ``(B, 1, H, W)`` mask logits, trained with AdamW."""

    def __init__(self, lr: float, weight_decay: float, image_size: int, tta_flip: bool,
                 tta_scales: Sequence[float], val_hce: bool) -> None:
        super().__init__(tta_flip, tta_scales, val_hce)
        self.lr, self.weight_decay, self._image_size = lr, weight_decay, image_size

    @property
    def image_size(self) -> int:
        """The default input side of :func:`heads.dis.predict_folder`."""
        return self._image_size

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` mask logits."""
        raise NotImplementedError

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The DiffDIS module's mask loss (SMP soft BCE + Dice) on the logits; no edge term."""
        return dis_loss({"mask": self.logits(batch["image"])}, batch["mask"], edge_weight=0.0)

    def predict_view(self, images: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the logits."""
        return self.logits(images).sigmoid()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates."""
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over :meth:`trainable_parameters`."""
        return torch.optim.AdamW(list(self.trainable_parameters()), lr=self.lr, weight_decay=self.weight_decay)


class SMPSegmentationModule(_MaskLogitsModule):
    """Baseline (a): an SMP model on an untrained timm encoder, trained from scratch.

    Args:
        arch: SMP architecture (``smp.create_model``'s ``arch``: ``"Unet"``, ``"FPN"``, …).
        encoder_name: SMP encoder; ``tu-<name>`` is any timm model with ``features_only``.
        encoder_weights: ``None`` (default): random init, no pretrained weights anywhere. Anything else
            downloads weights and is no longer baseline (a).
        encoder_depth: encoder stages (the output stride is ``2 ** encoder_depth``).
        decoder_channels: U-Net decoder widths (one per stage; ``None``: SMP's default). Ignored by
            architectures without this argument.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        image_size: default input side of :func:`heads.dis.predict_folder`.
        tta_flip: flip test-time augmentation in validation and test.
        tta_scales: test-time scales.
        val_hce: also compute HCE in validation.
        model_kwargs: further ``smp.create_model`` arguments.

    Raises:
        KeyError: an unknown architecture (SMP lists the valid ones).
    """

    def __init__(self, arch: str = "Unet", encoder_name: str = "tu-resnet18", encoder_weights: str | None = None,
                 encoder_depth: int = 5, decoder_channels: Sequence[int] | None = None, lr: float = 1e-3,
                 weight_decay: float = 1e-4, image_size: int = 256, tta_flip: bool = False,
                 tta_scales: Sequence[float] = (1.0,), val_hce: bool = False,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        import segmentation_models_pytorch as smp

        super().__init__(lr, weight_decay, image_size, tta_flip, tta_scales, val_hce)
        self.save_hyperparameters()
        kwargs = dict(model_kwargs or {})
        if decoder_channels is not None:
            kwargs["decoder_channels"] = list(decoder_channels)
        self.model = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=encoder_weights,
                                      encoder_depth=encoder_depth, in_channels=3, classes=1, **kwargs)
        self.size_multiple = 2 ** encoder_depth

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The SMP model's mask logits."""
        _check_images(images, self.size_multiple)
        return self.model(images)


def _unet_decoder(channels: Sequence[int], decoder_channels: Sequence[int] | None, **_: Any
                  ) -> tuple[nn.Module, nn.Module]:
    from segmentation_models_pytorch.base import SegmentationHead
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

    depth = len(channels) - 1
    widths = list(decoder_channels or [max(16, 128 // 2 ** i) for i in range(depth)])
    if len(widths) != depth:
        raise ValueError(f"decoder_channels must give one width per encoder map ({depth}), got {widths}")
    return UnetDecoder(encoder_channels=channels, decoder_channels=widths, n_blocks=depth), \
        SegmentationHead(widths[-1], 1, kernel_size=3)


def _fpn_decoder(channels: Sequence[int], pyramid_channels: int = 64, strides: Sequence[int] = (), **_: Any
                 ) -> tuple[nn.Module, nn.Module]:
    from segmentation_models_pytorch.base import SegmentationHead
    from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

    if len(channels) - 1 < 4:
        raise ValueError(f"SMP's FPN decoder needs 4 encoder maps, got {len(channels) - 1}")
    finest = strides[-4]  # the FPN's output sits at the stride of the finest of its four maps
    decoder = FPNDecoder(encoder_channels=channels, encoder_depth=len(channels) - 1, pyramid_channels=pyramid_channels,
                         segmentation_channels=pyramid_channels, dropout=0.0)
    return decoder, SegmentationHead(decoder.out_channels, 1, kernel_size=1, upsampling=finest)


#: decoder name -> builder of (SMP decoder, segmentation head) from the encoder's ``out_channels``
DECODERS: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {"unet": _unet_decoder, "fpn": _fpn_decoder}


class FrozenDiffusionSMPModule(FrozenPartState, _MaskLogitsModule):
    """Baseline (b): an SMP decoder on the frozen multi-scale features of a diffusion U-Net.

    Args:
        backbone: a registered name (e.g. ``sd-unet-scenes``) or a diffusers folder (the pretrained U-Net).
        decoder: ``"unet"`` or ``"fpn"`` (:data:`DECODERS`).
        layers: taps of the backbone (see the module doc for the default).
        timestep: DDPM index the image is noised to before the taps are read.
        output_strides: strides the taps are resized to (one per tap, increasing).
        decoder_channels: U-Net decoder widths, one per map (``None``: 128, 64, 32, 16 for four maps).
        pyramid_channels: FPN pyramid and segmentation width (a multiple of 32: SMP's FPN blocks use 32-group norms).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        image_size: default input side of :func:`heads.dis.predict_folder` (``None``: the backbone's).
        seed: the encoder's noise seed (noise is keyed by image content: a deterministic encoder).
        tta_flip: flip test-time augmentation in validation and test.
        tta_scales: test-time scales.
        val_hce: also compute HCE in validation.
        backbone_kwargs: extra ``create_backbone`` arguments.
        pad_rows: pad the encoder's CPU forwards to fixed rows (``False`` by default: the features feed a
            decoder being trained, not a store, so batch-independent bits buy nothing, and a 4-image batch
            padded to 32 rows costs 8× the forward; see :class:`~difffeat.extract.FeatureExtractor`).

    Raises:
        KeyError: an unknown decoder (the valid names listed).
        ValueError: taps / strides the encoder or decoder cannot use.
    """

    def __init__(self, backbone: str = "sd-unet-scenes", decoder: str = "unet",
                 layers: Sequence[str] = ("up_blocks.2", "up_blocks.1", "up_blocks.0", "mid_block"),
                 timestep: int = 50, output_strides: Sequence[int] | None = (2, 4, 8, 16),
                 decoder_channels: Sequence[int] | None = None, pyramid_channels: int = 64, lr: float = 1e-3,
                 weight_decay: float = 1e-4, image_size: int | None = None, seed: int = 0, tta_flip: bool = False,
                 tta_scales: Sequence[float] = (1.0,), val_hce: bool = False,
                 backbone_kwargs: dict[str, Any] | None = None, pad_rows: bool = False) -> None:
        from difffeat.encoder import DiffusionEncoder

        if decoder not in DECODERS:
            raise KeyError(f"unknown decoder {decoder!r}; expected one of {', '.join(DECODERS)}")
        encoder = DiffusionEncoder(backbone, list(layers), timestep, output_strides=output_strides, finetune=False,
                                   seed=seed, backbone_kwargs=backbone_kwargs, pad_rows=pad_rows)
        super().__init__(lr, weight_decay, image_size or encoder.backbone.image_size, tta_flip, tta_scales, val_hce)
        self.save_hyperparameters()
        self.encoder = encoder
        self.decoder, self.head = DECODERS[decoder](encoder.out_channels, decoder_channels=decoder_channels,
                                                    pyramid_channels=pyramid_channels, strides=encoder.strides)
        self.size_multiple = encoder.output_stride

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder and head on the frozen encoder's maps."""
        _check_images(images, self.size_multiple)
        return self.head(self.decoder(self.encoder(images)))

    # ------------------------------------------------------------------ frozen means frozen
    frozen_prefix = _FROZEN

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The decoder's and the head's parameters; never the encoder's."""
        return self.unfrozen_parameters()

    def on_fit_start(self) -> None:
        """Checks the backbone is frozen before any step."""
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise RuntimeError("the diffusion encoder of a frozen-feature baseline has trainable parameters")

