"""DiffewS-style few-shot segmentation: a diffusion U-Net fine-tuned to segment a query given its supports.

The model (:class:`DiffewS`), its loss (:func:`mask_loss`) and its LightningModule
(:class:`DiffewSModule`); the model surgery it relies on (KV fusion, the support input convolution)
is in :mod:`difffeat.backbones.attention`.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from difffeat.backbones.attention import DualConvIn, KVFusion
from difffeat.backbones.base import check_images
from heads.fewshot import FewShotModule, check_episodes

__all__ = ["DiffewS", "DiffewSModule", "EpisodeTraining", "mask_loss"]


class DiffewS(nn.Module):
    """DiffewS-style few-shot segmentation on a diffusers U-Net.

    The support pass feeds each support image concatenated with its mask (in ``[-1, 1]``, repeated to
    the image's channels) through a second input convolution
    (:func:`~difffeat.backbones.attention.support_conv_in`) and fills a K/V bank; the query pass attends
    to it in every self-attention (:class:`~difffeat.backbones.attention.KVFusion`) and regresses the
    query mask in one step.

    At pixel scale (no VAE) the paper's one-step prediction of the mask *latent* with a v-prediction
    model at ᾱ = 0 becomes: the query image is the network input at a fixed timestep, and a new
    one-channel output convolution (initialised with the mean of the original output filters) gives mask
    logits, trained with binary cross-entropy plus Dice (:func:`mask_loss`). The mask is not noised: at
    ᾱ = 0 the paper's noisy mask input carries no information.

    The support mask enters at the image's resolution (through the support input convolution), so
    no mask is downsampled to the fused grids: a support object of one pixel still marks its tokens,
    and nothing divides by a mask's area.

    **Query-only control** (``query_only=True``): the same network, trained the same way, that never
    sees a support: the support pass is skipped, the K/V bank stays empty and every self-attention is
    the query's own. (The paper-style control of a support "zeroed" would still fill the bank, but
    with one constant image: the same information, at twice the cost.) Its weights carry the flag
    (the ``query_only`` buffer), and loading them into a model with a support path raises: its
    support convolution was never trained.

    Args:
        backbone: a pixel-space ``UNet2DConditionModel`` adapter (e.g. ``sd-unet-scenes``) or folder;
            its weights are fine-tuned.
        timestep: the fixed DDPM index of both passes.
        query_only: the query-only control (see above).
    """

    def __init__(self, backbone: str = "sd-unet-scenes", timestep: int = 0, query_only: bool = False) -> None:
        super().__init__()
        from difffeat.backbones import create_backbone

        self.backbone = create_backbone(backbone).requires_grad_(True).train()
        self.timestep = self.backbone.schedule.validate([timestep])[0]
        model = self.backbone.model
        model.conv_in = DualConvIn(model.conv_in)
        old = model.conv_out
        new = nn.Conv2d(old.in_channels, 1, old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            new.weight.copy_(old.weight.mean(0, keepdim=True))
            new.bias.copy_(old.bias.mean(0, keepdim=True))
        model.conv_out = new
        self.fusion = KVFusion(model)
        self.register_buffer("query_only", torch.tensor(query_only))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Refuses weights of the other kind (query-only into a support model, or the reverse)."""
        saved = state_dict.get(prefix + "query_only")
        if saved is not None and bool(saved) != bool(self.query_only):
            kind = {True: "query-only (trained without any support)", False: "support-conditioned"}
            why = "its support convolution and K/V path were never trained; " if bool(saved) else ""
            raise ValueError(f"these DiffewS weights are {kind[bool(saved)]}, but the model is "
                             f"{kind[bool(self.query_only)]}: {why}build DiffewS(..., query_only={bool(saved)}) "
                             f"to load them")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                allow_empty_support: bool = False) -> torch.Tensor:
        """Mask logits of a batch of episodes: one support pass fills the K/V bank, one query pass reads it.

        Args:
            support: ``(E, k, C, H, W)`` support images.
            support_mask: ``(E, k, H, W)`` bool support masks.
            query: ``(E, C, H, W)`` query images.
            allow_empty_support: accept all-background support masks (the empty-support control).

        Returns:
            ``(E, H, W)`` query mask logits.

        Raises:
            ValueError: shapes that do not match, empty support masks, or images with another channel
                count than the backbone's (before any forward).
        """
        check_episodes(support, support_mask, query, allow_empty_support)
        check_images(query, self.backbone.image_channels, "query images")
        check_images(support.flatten(0, 1), self.backbone.image_channels, "support images")
        e, k, c = support.shape[:3]
        if self.query_only:
            return self.backbone(query, torch.full((e,), self.timestep, device=query.device))[:, 0]
        mask = (support_mask.float() * 2 - 1)[:, :, None].expand(-1, -1, c, -1, -1)
        s_in = torch.cat([support, mask], 2).flatten(0, 1)
        t = torch.full((e * k,), self.timestep, device=query.device)
        with self.fusion.write(shots=k):
            self.backbone(s_in, t)
        with self.fusion.read():
            return self.backbone(query, t[:e])[:, 0]

    def predict(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                allow_empty_support: bool = False) -> torch.Tensor:
        """Binary query masks of a batch of episodes (a :data:`~heads.fewshot.Predictor`).

        Args:
            support: ``(E, k, C, H, W)``.
            support_mask: ``(E, k, H, W)``.
            query: ``(E, C, H, W)``.
            allow_empty_support: accept all-background support masks (the empty-support control).

        Returns:
            ``(E, H, W)`` bool: logit > 0.
        """
        return self(support, support_mask, query, allow_empty_support) > 0


#: target value SMP's losses skip (its own SoftBCEWithLogitsLoss default); ignored pixels get it
_IGNORE = -100
_DICE = smp.losses.DiceLoss(mode="binary", from_logits=True, ignore_index=_IGNORE)
_BCE = smp.losses.SoftBCEWithLogitsLoss(ignore_index=_IGNORE, reduction="sum")


def mask_loss(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice, SMP's (``SoftBCEWithLogitsLoss`` + ``DiceLoss(mode="binary")``).

    Ignored pixels are left out of both terms: they are masked out of Dice's sums, and the cross-entropy
    is averaged over the valid pixels only (SMP's own mean would also divide by the ignored ones, so a
    batch with a wide boundary band would weigh less). Dice is SMP's, aggregated over the whole batch.

    Args:
        logits: mask logits ``(E, H, W)``.
        target: binary query masks ``(E, H, W)``.
        ignore: pixels to leave out ``(E, H, W)`` (e.g. PASCAL's 255 boundary), or ``None``.

    Returns:
        The scalar loss.
    """
    target = target.float()
    if ignore is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    else:
        valid = ~ignore.bool()
        target = torch.where(valid, target, torch.full_like(target, _IGNORE))
    return _DICE(logits, target) + _BCE(logits, target) / valid.sum().clamp(min=1)


class EpisodeTraining:
    """``training_step`` for a few-shot LightningModule whose ``self.model`` gives episodes' mask logits.

    The loss is :func:`mask_loss` of the batch's query masks, ignored pixels left out (``train/loss``).
    Also logged: ``train/pair_loss``, the loss of the batch's positive counterfactual-pair episodes alone
    (detached, from the same logits): the loss a model that ignores its support cannot bring down, since
    one query image comes with two targets. List it before the LightningModule bases.
    """

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The batch's :func:`mask_loss` (logs it and the pair episodes' loss)."""
        logits = self.model(batch["support"], batch["support_mask"], batch["query"])
        ignore = batch.get("query_ignore")
        loss = mask_loss(logits, batch["query_mask"], ignore)
        self.log("train/loss", loss, prog_bar=True)
        if "pair" in batch:
            paired = torch.as_tensor(batch["pair"]) >= 0
            paired &= ~torch.as_tensor(batch.get("negative", torch.zeros_like(paired))).bool()
            if paired.any():
                pair_loss = mask_loss(logits[paired], batch["query_mask"][paired],
                                      None if ignore is None else ignore[paired])
                self.log("train/pair_loss", pair_loss.detach())
        return loss


class DiffewSModule(EpisodeTraining, FewShotModule):
    """Fine-tunes :class:`DiffewS` on base-class episodes and evaluates it on episodes.

    Args:
        backbone: a pixel-space ``UNet2DConditionModel`` adapter name or folder.
        timestep: the fixed DDPM index of both passes.
        lr: AdamW learning rate.
        num_classes: class-id space of the metric.
        vote: k-shot by per-shot vote instead of one native k-shot pass (all supports in the K/V bank).
        query_only: train the query-only control (:class:`DiffewS`'s ``query_only``).
    """

    def __init__(self, backbone: str = "sd-unet-scenes", timestep: int = 0, lr: float = 1e-4,
                 num_classes: int = 20, vote: bool = False, query_only: bool = False) -> None:
        super().__init__(num_classes, vote)
        self.save_hyperparameters()
        self.lr = lr
        self.model = DiffewS(backbone, timestep, query_only)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over every trainable parameter (the whole U-Net and its new convolutions)."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
