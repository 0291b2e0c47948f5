"""DiffDIS-style dichotomous image segmentation: a diffusion U-Net fine-tuned to predict a mask in one step.

The model (:class:`DiffDIS`), its loss (:func:`dis_loss`), its LightningModule (:class:`DiffDISModule`)
and folder inference (:func:`predict_folder`). The recipe follows DiffDIS (Yu et al., "High-Precision
Dichotomous Image Segmentation via Probing Diffusion Capacity", ICLR 2025) and its public training code:

* **Input.** The image is concatenated along channels with the noisy target, and the U-Net's input
  convolution is widened to take both: its pretrained filters repeated over the new channels and halved
  (the reference's ``conv_in`` surgery, Marigold's; :func:`~difffeat.backbones.attention.support_conv_in`),
  so an input whose target channels equal its image channels gives the pretrained first features.
* **One step from the final timestep.** Training noises the target to ``t = T - 1`` (999), the U-Net's
  output is read as a clean estimate ``x̂0`` through the checkpoint's prediction type by a DDIM step to
  ``ᾱ = 1`` (diffusers' ``DDIMScheduler``, ``pred_original_sample``; the reference uses DDPM's step, the
  same ``x̂0``); inference feeds pure noise at ``T - 1`` and keeps ``x̂0``. No iteration.
* **Batch-discriminative embedding.** Mask and edge targets are stacked along the batch (mask half first)
  beside the same image twice; the task of each row is the 4-vector ``[sin(o), cos(o)]`` of its one-hot
  task code ``o`` (mask ``(1, 0)``, edge ``(0, 1)``), projected by a new ``TimestepEmbedding`` and added
  to the time embedding: diffusers' own ``class_embed_type="projection"`` with
  ``projection_class_embeddings_input_dim=4`` and ``class_embeddings_concat=False``, as the reference
  builds it. The embedding trains at ``class_embedding_lr_scale`` (10, the reference's) times the rate.
* **Detail-balancing interaction.** At the lowest resolution (the mid block's output, by a forward hook)
  the mask tokens cross-attend to the edge tokens of the same image and the edge tokens to the mask
  tokens, added as a residual. The reference's extra attention is copied from the mid block's
  self-attention; here its query / key / value projections and its layer norm are copied likewise (when
  the mid block has a transformer of the same width), and its output projection starts at **zero** so
  the pretrained function is kept at initialisation (a choice of this implementation).
* **Multi-scale image conditioning.** The reference feeds the image encoded at 1/2, 1/4 and 1/8 size
  into the U-Net's blocks. Here the image, resized to each skip feature's resolution, goes through a
  zero-initialised 3×3 convolution whose output is added to that skip feature (and to the mid block's
  output) through diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``,
  the ControlNet path: at initialisation it adds exact zeros.
* **Edge auxiliary.** The edge target is the DIS data's 5×5 ``dilation − erosion`` band. With
  ``edge_weight=0`` (the "without edge auxiliary" baseline) only the mask half runs: no edge target, no
  edge loss, no interaction, half the compute.

Scale and choices for the CPU (where this project runs):

* **Pixel space.** The project's diffusion U-Nets for scenes (``sd-unet-scenes``, pretrained on
  unlabelled scenes by ``configs/ddpm_scenes.yaml``) are pixel-space RGB models; a VAE would add an
  encoder/decoder pass per image and per target at every step, beyond a 2-core machine. So the target
  (mask or edge in ``{-1, 1}``) is repeated to the U-Net's channels, as the reference repeats its masks
  to RGB before the VAE, and the prediction is the channel mean of ``x̂0``. A backbone with a VAE is refused.
* **Loss** (``loss``): ``"bce_dice"`` (default): SMP's ``SoftBCEWithLogitsLoss`` + binary ``DiceLoss``
  (:func:`heads.fewshot_diffews.mask_loss`) with ``x̂0`` read as logits; in pixel space ``x̂0`` *is* the
  mask, and Dice balances the thin edge band (~5 % of the pixels). ``"mse"``: the reference's objective,
  mean squared error between ``x̂0`` and the target in ``{-1, 1}`` (the reference takes it on latents),
  the probability then being ``(clamp(x̂0, -1, 1) + 1) / 2``. Mask and edge terms are weighted ``1 :
  edge_weight`` (the reference: 1 : 1).
* **Noise.** Plain Gaussian noise (the reference uses multi-resolution "pyramid" noise); at inference one
  seeded noise map per resolution, the same for every image, so a prediction depends neither on the
  batch it is in nor on the global random state. Noise at ``T - 1`` carries a trace of the target
  (``√ᾱ`` ≈ 0.0064 of it for DDPM's linear schedule) in training only, as in the reference.
* **Prediction type.** For DDPM's linear schedule ``√ᾱ_{T-1}`` ≈ 0.0064, so ``x̂0`` of an ε-prediction
  model divides the error by it (the reference's SD-2.1 schedule: 0.068). ``prediction_type="sample"``
  reads the U-Net's output as ``x̂0`` itself instead (the configs do so); the default is the checkpoint's.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from difffeat.backbones.attention import support_conv_in
from difffeat.backbones.base import Backbone, check_images
from difffeat.store import replace_folder
from heads.dis_metrics import DISMetrics
from heads.fewshot_diffews import mask_loss

__all__ = ["TASKS", "DISModule", "DetailBalancingInteraction", "DiffDIS", "DiffDISModule", "dis_loss",
           "predict_folder", "task_embedding", "tta_predict"]

#: the tasks stacked along the batch, in this order
TASKS = ("mask", "edge")
_LOSSES = ("bce_dice", "mse")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def task_embedding(task: int, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The batch-discriminative embedding of a task: ``[sin(o), cos(o)]`` of its one-hot code ``o``.

    Args:
        task: index into :data:`TASKS` (0 mask, 1 edge).
        batch: rows.
        device: where the tensor goes.
        dtype: its dtype.

    Returns:
        ``(batch, 4)``.
    """
    code = torch.zeros(2, dtype=dtype, device=device)
    code[task] = 1
    return torch.cat([code.sin(), code.cos()]).expand(batch, -1)


class DetailBalancingInteraction(nn.Module):
    """Cross-attention between the mask half and the edge half of a stacked batch, as a residual.

    Tokens of row ``i`` of the mask half attend to those of row ``i`` of the edge half and the reverse,
    with one shared attention (the two halves hold the same images). Output projection zero-initialised.

    Args:
        channels: feature width at the lowest resolution.
        heads: attention heads.
        like: a diffusers ``BasicTransformerBlock`` of this width to copy the norm and the query / key /
            value projections from (its ``norm1`` / ``attn1``), or ``None`` for a fresh init.
    """

    def __init__(self, channels: int, heads: int, like: nn.Module | None = None) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        heads = max(1, min(heads, channels))
        while channels % heads:
            heads -= 1
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, heads=heads, dim_head=channels // heads, bias=False)
        if like is not None:
            src = like.attn1
            if src.to_q.weight.shape == self.attn.to_q.weight.shape and src.to_k.bias is None:
                with torch.no_grad():
                    for name in ("to_q", "to_k", "to_v"):
                        getattr(self.attn, name).weight.copy_(getattr(src, name).weight)
            norm = getattr(like, "norm1", None)
            if isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.weight.shape == (channels,):
                self.norm.load_state_dict(norm.state_dict())
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(2B, C, h, w)`` (mask rows, then edge rows) plus the cross-attended residual."""
        b2, c, h, w = x.shape
        if b2 % 2:
            raise ValueError(f"the interaction needs a stacked mask/edge batch of even size, got {b2}")
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        mask, edge = tokens.chunk(2)
        out = torch.cat([self.attn(mask, encoder_hidden_states=edge), self.attn(edge, encoder_hidden_states=mask)])
        return x + out.transpose(1, 2).reshape(b2, c, h, w)


class DiffDIS(nn.Module):
    """DiffDIS-style one-step segmenter on a pixel-space diffusers ``UNet2DConditionModel`` (see the module doc).

    Args:
        backbone: a registered name (e.g. ``sd-unet-scenes``), a diffusers folder (e.g. one exported by
            :class:`difffeat.train.DiffusionModule`) or a built adapter; fine-tuned whole (an adapter is
            modified in place).
        edge_weight: weight of the edge term; 0 drops the edge half (no edge auxiliary).
        interaction: the detail-balancing mask/edge cross-attention at the lowest resolution (needs the edge half).
        multiscale_condition: the zero-initialised image conditioning of the skip features.
        timestep: the DDPM index of the single step (``None``: the final one, ``T - 1``).
        prediction_type: how the U-Net's output is read (``"epsilon"``, ``"v_prediction"``, ``"sample"``;
            ``None``: the checkpoint's).
        loss: ``"bce_dice"`` (``x̂0`` as logits) or ``"mse"`` (``x̂0`` against the ``{-1, 1}`` target).
        seed: seed of the inference noise.
        backbone_kwargs: extra ``create_backbone`` arguments.

    Raises:
        TypeError: the backbone is not a ``UNet2DConditionModel``, has a VAE, or already has a class embedding.
        ValueError: an unknown loss or prediction type, or a backbone whose images are not RGB.
    """

    def __init__(self, backbone: str | Backbone = "sd-unet-scenes", edge_weight: float = 1.0, interaction: bool = True,
                 multiscale_condition: bool = True, timestep: int | None = None, prediction_type: str | None = None,
                 loss: Literal["bce_dice", "mse"] = "bce_dice", seed: int = 0,
                 backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        from diffusers import DDIMScheduler
        from diffusers.models.embeddings import TimestepEmbedding

        from difffeat.backbones import create_backbone

        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
        if edge_weight < 0:
            raise ValueError(f"edge_weight must be >= 0, got {edge_weight}")
        if not isinstance(backbone, Backbone):
            backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        self.backbone = backbone.requires_grad_(True).train()
        unet = self.backbone.model
        if type(unet).__name__ != "UNet2DConditionModel":
            raise TypeError(f"DiffDIS needs a UNet2DConditionModel (class embedding and skip residuals), got "
                            f"{type(unet).__name__} from {backbone.name!r}")
        if self.backbone.vae is not None:
            raise TypeError(f"{backbone.name!r} is a latent model with a VAE; DiffDIS here runs in pixel space only "
                            f"(see heads.dis)")
        if self.backbone.image_channels != 3:
            raise ValueError(f"{backbone.name!r} takes {self.backbone.image_channels}-channel images; DIS images "
                             f"are RGB")
        if unet.class_embedding is not None:
            raise TypeError(f"{backbone.name!r} already has a class embedding; the task embedding needs a free one")
        self.loss_kind, self.edge_weight, self.seed = loss, float(edge_weight), seed
        self.with_edge = self.edge_weight > 0
        schedule = self.backbone.schedule
        self.timestep = schedule.validate([schedule.num_train_timesteps - 1 if timestep is None else timestep])[0]
        self.prediction_type = prediction_type or schedule.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")
        a = schedule.alphas_cumprod
        betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
        self.scheduler = DDIMScheduler(num_train_timesteps=len(a), trained_betas=betas.float().numpy(),
                                       prediction_type=self.prediction_type, clip_sample=False,
                                       set_alpha_to_one=True, timestep_spacing="trailing")
        self.scheduler.set_timesteps(1)
        self.scheduler.timesteps = torch.tensor([self.timestep])  # one step from our timestep to ᾱ = 1

        # input: image ⊕ noisy target, pretrained filters repeated and halved
        self.channels = int(unet.config.in_channels)
        unet.conv_in = support_conv_in(unet.conv_in)
        unet.register_to_config(in_channels=2 * self.channels)
        # task embedding added to the time embedding (diffusers' "projection" class embedding)
        time_dim = unet.time_embedding.linear_2.out_features
        unet.class_embedding = TimestepEmbedding(4, time_dim)
        unet.register_to_config(class_embed_type="projection", projection_class_embeddings_input_dim=4,
                                class_embeddings_concat=False)
        self.condition = _SkipConditioning(unet, self.channels) if multiscale_condition else None
        self.interaction = None
        self._stacked = False
        if interaction and self.with_edge:
            mid = unet.mid_block
            width = int(unet.config.block_out_channels[-1])
            blocks = [m for m in mid.modules() if type(m).__name__ == "BasicTransformerBlock"]
            like = blocks[0] if blocks and blocks[0].attn1.to_q.in_features == width else None
            heads = like.attn1.heads if like is not None else 4
            self.interaction = DetailBalancingInteraction(width, heads, like)
            mid.register_forward_hook(self._interact)
        self.downsampling = 2 ** sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))

    @property
    def unet(self) -> nn.Module:
        """The fine-tuned diffusers U-Net."""
        return self.backbone.model

    def _interact(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        return self.interaction(output) if self._stacked and self.interaction is not None else None

    def class_embedding_parameters(self) -> list[nn.Parameter]:
        """The task-embedding projection's parameters (trained at a higher rate)."""
        return list(self.unet.class_embedding.parameters())

    def check(self, images: torch.Tensor) -> None:
        """Checks a batch of images: ``(B, 3, H, W)`` in ``[-1, 1]``, sides multiples of the U-Net's downsampling.

        Raises:
            ValueError: naming the shape or range and what is expected.
        """
        check_images(images, 3, "DIS images")
        if images.shape[-1] % self.downsampling or images.shape[-2] % self.downsampling:
            raise ValueError(f"DIS images {tuple(images.shape)}: height and width must be multiples of "
                             f"{self.downsampling} (the U-Net's downsampling); resize them first")

    def noise(self, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        """The inference noise: one seeded ``(1, C, H, W)`` map, expanded to the batch of ``shape``."""
        gen = torch.Generator().manual_seed(self.seed)
        n = torch.randn((1, self.channels, *shape[-2:]), generator=gen)
        return n.to(device).expand(shape[0], -1, -1, -1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, edge: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step: ``x̂0`` maps of the mask (and edge) tasks.

        With ``mask`` (training) the targets are noised to the step's timestep; without, the input is pure
        noise (:meth:`noise` unless ``noise`` is given).

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``.
            mask: ``(B, 1, H, W)`` binary target, or ``None`` (inference).
            edge: ``(B, 1, H, W)`` binary edge target (needed with ``mask`` when the edge half runs).
            noise: ``(T·B, C, H, W)`` noise, ``T`` the number of tasks run (default: fresh Gaussian noise in
                training, the seeded map at inference).

        Returns:
            ``{"mask": (B, 1, H, W)}`` and, with the edge half, ``"edge"``: channel means of ``x̂0``.

        Raises:
            ValueError: bad images, a target of another shape, or a missing edge target.
        """
        self.check(images)
        b, _, h, w = images.shape
        tasks = 2 if self.with_edge else 1
        if mask is not None:
            targets = [mask] + ([edge] if self.with_edge else [])
            for name, t in zip(TASKS, targets, strict=False):
                if t is None or tuple(t.shape) != (b, 1, h, w):
                    got = "nothing" if t is None else tuple(t.shape)
                    raise ValueError(f"{name} target must be (B, 1, H, W) = {(b, 1, h, w)}, got {got}")
            x0 = (torch.cat(targets).to(images.dtype) * 2 - 1).expand(-1, self.channels, -1, -1)
        if noise is None:
            noise = torch.randn((tasks * b, self.channels, h, w), device=images.device, dtype=images.dtype) \
                if mask is not None else self.noise((tasks * b, self.channels, h, w), images.device)
        if noise.shape != (tasks * b, self.channels, h, w):
            raise ValueError(f"noise must be {(tasks * b, self.channels, h, w)}, got {tuple(noise.shape)}")
        t = torch.full((tasks * b,), self.timestep, device=images.device, dtype=torch.long)
        x_t = self.backbone.schedule.add_noise(x0, noise, t) if mask is not None else noise.to(images.dtype)
        image_rows = images.repeat(tasks, 1, 1, 1)
        labels = torch.cat([task_embedding(k, b, images.device, images.dtype) for k in range(tasks)])
        x0_hat = self.step(image_rows, x_t, t, labels)
        maps = x0_hat.mean(1, keepdim=True).chunk(tasks)
        return dict(zip(TASKS, maps, strict=False))

    def step(self, images: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The U-Net on ``image ⊕ x_t`` with task embeddings ``labels``, read as ``x̂0`` (``(N, C, H, W)``)."""
        cond = self.backbone.condition(None, len(images), images.dtype, images.device)["encoder_hidden_states"]
        residuals = {} if self.condition is None else self.condition(images)
        with self._stack(self.with_edge and len(images) % 2 == 0):
            out = self.unet(torch.cat([images, x_t], 1), self.backbone.schedule.model_timesteps(t),
                            encoder_hidden_states=cond, class_labels=labels, **residuals).sample
        return self.scheduler.step(out, self.timestep, x_t, eta=0.0).pred_original_sample

    @contextmanager
    def _stack(self, on: bool):
        self._stacked = on
        try:
            yield
        finally:
            self._stacked = False

    def probabilities(self, x0_hat: torch.Tensor) -> torch.Tensor:
        """Probabilities in ``[0, 1]`` of ``x̂0`` maps, as the loss reads them."""
        if self.loss_kind == "mse":
            return (x0_hat.clamp(-1, 1) + 1) / 2
        return x0_hat.sigmoid()

    @property
    def image_size(self) -> int:
        """The U-Net's training side (the default input size of :func:`predict_folder`)."""
        return self.backbone.image_size

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip: bool = False, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
        """Mask probabilities in one step, with optional test-time augmentation (:func:`tta_predict`).

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``.
            flip: add horizontally flipped views.
            scales: image scales (1.0 = as given), each side rounded to a multiple of the U-Net's downsampling.

        Returns:
            ``(B, 1, H, W)`` float probabilities in ``[0, 1]``.
        """
        self.check(images)
        return tta_predict(lambda x: self.probabilities(self(x)["mask"]), images, flip, scales,
                                 self.downsampling)


def tta_predict(predict: Any, images: torch.Tensor, flip: bool = False, scales: Sequence[float] = (1.0,),
                      multiple: int = 1) -> torch.Tensor:
    """Mean probabilities over flipped and rescaled views, each mapped back to the input's frame and size.

    The views are the image itself and, with ``flip``, its horizontal mirror, at each of ``scales``
    (each side rounded to a multiple of ``multiple``, at least ``multiple``; antialiased bilinear
    resizing). Each view's probabilities are un-flipped and resized back (bilinear) before averaging.

    Args:
        predict: ``(N, 3, h, w)`` images -> ``(N, 1, h, w)`` probabilities.
        images: ``(B, 3, H, W)`` in ``[-1, 1]``.
        flip: add horizontally flipped views.
        scales: image scales (1.0 = as given).
        multiple: the sides a model accepts are multiples of this.

    Returns:
        ``(B, 1, H, W)`` float probabilities in ``[0, 1]``.

    Raises:
        ValueError: a scale <= 0.
    """
    h, w = images.shape[-2:]
    views = []
    for s in scales:
        if s <= 0:
            raise ValueError(f"test-time scales must be > 0, got {s}")
        size = tuple(max(multiple, round(n * s / multiple) * multiple) for n in (h, w))
        x = images if size == (h, w) else F.interpolate(images, size, mode="bilinear", align_corners=False,
                                                        antialias=True).clamp(-1, 1)
        for flipped in (False, True) if flip else (False,):
            v = x.flip(-1) if flipped else x
            p = predict(v)
            p = p.flip(-1) if flipped else p
            views.append(p if size == (h, w) else F.interpolate(p, (h, w), mode="bilinear", align_corners=False))
    return torch.stack(views).mean(0).clamp(0, 1)


class _SkipConditioning(nn.Module):
    """Zero-initialised 3×3 convolutions of the image at every skip feature's resolution (and the mid block's).

    Returns diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual`` keywords.
    """

    def __init__(self, unet: nn.Module, image_channels: int) -> None:
        super().__init__()
        skips = [(unet.conv_in.out_channels, 1)]  # (channels, downsampling) of each down_block_res_sample
        scale = 1
        for block in unet.down_blocks:
            skips += [(r.out_channels, scale) for r in block.resnets]
            if getattr(block, "downsamplers", None):
                scale *= 2
                skips += [(d.out_channels, scale) for d in block.downsamplers]
        self.scales = [s for _, s in skips] + [scale]
        self.convs = nn.ModuleList(nn.Conv2d(image_channels, c, 3, padding=1)
                                   for c in [c for c, _ in skips] + [int(unet.config.block_out_channels[-1])])
        for conv in self.convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        h, w = images.shape[-2:]
        out, cache = [], {}
        for conv, s in zip(self.convs, self.scales, strict=True):
            if s not in cache:
                cache[s] = images if s == 1 else F.interpolate(images, (h // s, w // s), mode="area")
            out.append(conv(cache[s]))
        return {"down_block_additional_residuals": tuple(out[:-1]), "mid_block_additional_residual": out[-1]}


def dis_loss(maps: dict[str, torch.Tensor], mask: torch.Tensor, edge: torch.Tensor | None = None,
             edge_weight: float = 1.0, kind: Literal["bce_dice", "mse"] = "bce_dice") -> dict[str, torch.Tensor]:
    """The DiffDIS loss: the mask term plus ``edge_weight`` times the edge term.

    Args:
        maps: :meth:`DiffDIS.forward`'s ``x̂0`` maps (``"mask"``, optional ``"edge"``).
        mask: ``(B, 1, H, W)`` binary mask.
        edge: ``(B, 1, H, W)`` binary edge band (used when ``edge_weight > 0``).
        edge_weight: weight of the edge term; with 0 there is no edge term at all.
        kind: ``"bce_dice"`` (SMP's soft BCE + Dice, :func:`heads.fewshot_diffews.mask_loss`, ``x̂0`` as
            logits) or ``"mse"`` (the reference's: ``x̂0`` against the target in ``{-1, 1}``).

    Returns:
        ``{"loss", "mask_loss"}`` and, with ``edge_weight > 0``, ``"edge_loss"``.

    Raises:
        ValueError: an edge weight > 0 without edge maps or targets.
    """
    def term(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if kind == "mse":
            return F.mse_loss(pred, target.to(pred.dtype) * 2 - 1)
        return mask_loss(pred[:, 0], target[:, 0] > 0.5)

    out = {"mask_loss": term(maps["mask"], mask)}
    out["loss"] = out["mask_loss"]
    if edge_weight > 0:
        if "edge" not in maps or edge is None:
            raise ValueError("edge_weight > 0 needs the edge maps and the edge target")
        out["edge_loss"] = term(maps["edge"], edge)
        out["loss"] = out["mask_loss"] + edge_weight * out["edge_loss"]
    return out


class DISModule(L.LightningModule):
    """What every DIS segmenter's LightningModule shares: training-step logging, DIS-suite evaluation, TTA.

    A subclass builds its network, then implements :meth:`losses` (a dict with ``"loss"``, from a
    :class:`~difffeat.data.dis.DISDataModule` batch), :meth:`predict_view` (probabilities of one view)
    and :meth:`configure_optimizers`; it sets :attr:`size_multiple` (the sides the network accepts are
    multiples of it) and :attr:`image_size` (the default input side of :func:`predict_folder`).

    Validation logs the DIS suite without HCE (``val/<metric>``, cheap enough per epoch); testing logs the
    whole suite (``test/<metric>``, or ``test/<i>/<metric>`` for the ``i``-th of several test sets), both
    from :class:`~heads.dis_metrics.DISMetrics` accumulated over the epoch's images.

    Args:
        tta_flip: flip test-time augmentation in validation, test and :meth:`predict`.
        tta_scales: test-time scales.
        val_hce: also compute HCE in validation.
    """

    #: the network takes sides that are multiples of this
    size_multiple: int = 1

    def __init__(self, tta_flip: bool = False, tta_scales: Sequence[float] = (1.0,), val_hce: bool = False) -> None:
        super().__init__()
        self.tta_flip, self.tta_scales = tta_flip, tuple(tta_scales)
        self.val_metrics = DISMetrics(with_hce=val_hce)
        self._test_metrics: dict[int, DISMetrics] = {}

    @property
    def image_size(self) -> int:
        """The default input side of :func:`predict_folder`."""
        raise NotImplementedError

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training loss (``"loss"``) and its terms for a batch."""
        raise NotImplementedError

    def predict_view(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` mask probabilities in ``[0, 1]`` of ``(B, 3, H, W)`` images, no augmentation."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip: bool = False, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
        """Mask probabilities with optional test-time augmentation (:func:`tta_predict`).

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``.
            flip: add horizontally flipped views.
            scales: image scales (1.0 = as given).

        Returns:
            ``(B, 1, H, W)`` float probabilities in ``[0, 1]``.
        """
        return tta_predict(self.predict_view, images, flip, scales, self.size_multiple)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """:meth:`losses` of one step; logs ``train/loss`` and its other terms."""
        losses = self.losses(batch)
        n = len(batch["image"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=n)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train/{name}", value.detach(), batch_size=n)
        return losses["loss"]

    def _predict(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.predict(batch["image"], self.tta_flip, self.tta_scales)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Adds the batch's predictions to the validation metrics."""
        self.val_metrics.update(self._predict(batch), batch["mask"] > 0.5)

    def on_validation_epoch_end(self) -> None:
        """Logs the validation suite over the epoch's images and resets it."""
        if self.val_metrics.num_images or self.trainer.world_size > 1:
            self.log_dict({f"val/{k}": v.float() for k, v in self.val_metrics.compute().items()})
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Adds the batch's predictions to the metrics of its test set (the whole suite, HCE included)."""
        if dataloader_idx not in self._test_metrics:
            self._test_metrics[dataloader_idx] = DISMetrics(with_hce=True).to(self.device)
        self._test_metrics[dataloader_idx].update(self._predict(batch), batch["mask"] > 0.5)

    def on_test_epoch_end(self) -> None:
        """Logs each test set's suite and resets it."""
        several = len(self._test_metrics) > 1
        for i, metric in sorted(self._test_metrics.items()):
            prefix = f"test/{i}/" if several else "test/"
            self.log_dict({prefix + k: v.float() for k, v in metric.compute().items()})
            metric.reset()
        self._test_metrics.clear()


class DiffDISModule(DISModule):
    """Fine-tunes :class:`DiffDIS` on :class:`~difffeat.data.dis.DISDataModule` batches and scores it.

    Evaluation, logging and test-time augmentation are :class:`DISModule`'s.

    Args:
        backbone: a pixel-space ``UNet2DConditionModel`` name or folder.
        edge_weight: weight of the edge auxiliary (0: the baseline without it).
        interaction: the detail-balancing cross-attention.
        multiscale_condition: the zero-initialised image conditioning of the skips.
        timestep: the single step's DDPM index (``None``: ``T - 1``).
        prediction_type: override of the checkpoint's prediction type.
        loss: ``"bce_dice"`` or ``"mse"`` (see :func:`dis_loss`).
        lr: AdamW learning rate (the reference's 3e-5 with Adam).
        class_embedding_lr_scale: learning-rate factor of the task embedding (the reference's 10).
        weight_decay: AdamW weight decay.
        tta_flip: flip test-time augmentation in validation and test.
        tta_scales: test-time scales.
        val_hce: also compute HCE in validation.
        seed: inference-noise seed.
        backbone_kwargs: extra ``create_backbone`` arguments.
    """

    def __init__(self, backbone: str = "sd-unet-scenes", edge_weight: float = 1.0, interaction: bool = True,
                 multiscale_condition: bool = True, timestep: int | None = None, prediction_type: str | None = None,
                 loss: Literal["bce_dice", "mse"] = "bce_dice", lr: float = 3e-5,
                 class_embedding_lr_scale: float = 10.0, weight_decay: float = 0.0, tta_flip: bool = False,
                 tta_scales: Sequence[float] = (1.0,),
                 val_hce: bool = False, seed: int = 0, backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(tta_flip, tta_scales, val_hce)
        self.save_hyperparameters()
        self.model = DiffDIS(backbone, edge_weight, interaction, multiscale_condition, timestep, prediction_type,
                             loss, seed, backbone_kwargs)
        self.lr, self.class_embedding_lr_scale, self.weight_decay = lr, class_embedding_lr_scale, weight_decay
        self.size_multiple = self.model.downsampling

    @property
    def image_size(self) -> int:
        """The U-Net's training side."""
        return self.model.image_size

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """:func:`dis_loss` of one stacked mask/edge step."""
        maps = self.model(batch["image"], batch["mask"], batch.get("edge"))
        return dis_loss(maps, batch["mask"], batch.get("edge"), self.model.edge_weight, self.model.loss_kind)

    def predict_view(self, images: torch.Tensor) -> torch.Tensor:
        """One-step mask probabilities of one view."""
        return self.model.probabilities(self.model(images)["mask"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the whole U-Net and the new modules; the task embedding at a higher rate."""
        special = {id(p) for p in self.model.class_embedding_parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in special]
        return torch.optim.AdamW([
            {"params": rest, "lr": self.lr},
            {"params": self.model.class_embedding_parameters(), "lr": self.lr * self.class_embedding_lr_scale},
        ], lr=self.lr, weight_decay=self.weight_decay)


def _images_in(image_dir: Path) -> list[Path]:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist or is not a folder")
    files = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {image_dir} holds no image ({', '.join(_IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise ValueError(f"images {stems[p.stem]} and {p} share the stem {p.stem!r}: their masks would "
                             f"overwrite each other")
        stems[p.stem] = p
    return files


@torch.no_grad()
def predict_folder(model: DiffDIS | DISModule, image_dir: str | Path, out_dir: str | Path,
                   size: int | None = None, flip: bool = False, scales: Sequence[float] = (1.0,),
                   overwrite: bool = False) -> list[Path]:
    """Writes one 8-bit grey PNG mask per image of a folder, all or nothing.

    Each image is resized to ``size × size`` for the model and its probabilities resized back to the
    image's own size (DIS scores at the original resolution), then stored as ``uint8(255 · p)``
    (truncating, what :class:`~heads.dis_metrics.DISMetrics` assumes) under the image's stem. The PNGs
    are written into a temporary folder beside ``out_dir``, renamed to ``out_dir`` only once every image
    succeeded; after any error the temporary folder is removed, so no partial prediction folder is left.

    Args:
        model: the trained model, or any :class:`DISModule` (DiffDIS or a baseline).
        image_dir: folder of images (``.jpg``, ``.png``, … ; not recursive).
        out_dir: the prediction folder to create.
        size: model input side (``None``: the model's ``image_size``); a multiple of its ``size_multiple``.
        flip: flip test-time augmentation.
        scales: test-time scales.
        overwrite: replace an existing ``out_dir`` (else refused).

    Returns:
        The written mask paths, in image order.

    Raises:
        FileNotFoundError: ``image_dir`` is missing.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is off.
        ValueError: ``image_dir`` holds no image, or two images share a stem.
        difffeat.data.dis.DISFileError: an unreadable or truncated image (named).
    """
    from difffeat.data.dis import read_image

    image_dir, out_dir = Path(image_dir), Path(out_dir)
    files = _images_in(image_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"prediction folder {out_dir} exists; remove it or pass overwrite=True")
    size = size or model.image_size
    device = next(model.parameters()).device
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    was_training = model.training
    model.eval()
    try:
        written = []
        for path in files:
            pixels = read_image(path)  # DISFileError names the file
            h, w = pixels.shape[:2]
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
            p = model.predict(x, flip, scales)
            p = F.interpolate(p, (h, w), mode="bilinear", align_corners=False).clamp(0, 1)[0, 0]
            png = (p * 255).to(torch.uint8).cpu().numpy()
            Image.fromarray(np.ascontiguousarray(png), mode="L").save(tmp / f"{path.stem}.png")
            written.append(out_dir / f"{path.stem}.png")
        replace_folder(tmp, out_dir)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)

