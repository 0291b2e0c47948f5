"""Few-shot semantic segmentation on diffusion features.

This file holds the episodic metric of the HSNet protocol, the training-free prototype baseline
(PANet-style), the DiffewS-style model and the LightningModule that trains and evaluates them.

Metric (exact protocol): over all episodes, foreground intersection and union are *summed per class*;
``mIoU`` is the mean over the classes seen of ``ΣI_c / ΣU_c`` (not a mean of per-episode IoUs), and
``FB-IoU`` is ``½ (ΣI_fg / ΣU_fg + ΣI_bg / ΣU_bg)`` summed over all episodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from difffeat.backbones.attention import DualConvIn, KVFusion
from difffeat.backbones.base import check_images
from difffeat.extract import FeatureExtractor
from difffeat.readout import PerPixel, concat_features

__all__ = ["DiffewS", "FeatureCache", "FewShotIoU", "FewShotSegmentationModule", "PrototypeSegmenter",
           "dense_features", "episode_masks", "mask_loss", "masked_average", "shot_vote"]

#: a batched few-shot predictor: support ``(E, k, C, H, W)``, support masks ``(E, k, H, W)``, queries
#: ``(E, C, H, W)`` → binary query masks ``(E, H, W)``
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FewShotIoU(Metric):
    """mIoU and FB-IoU of binary episode predictions, summed per class over episodes.

    Args:
        num_classes: size of the class-id space (ids ``0 … num_classes-1``).
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        for name in ("intersection", "union"):
            self.add_state(name, torch.zeros(2, num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_ids: torch.Tensor,
               ignore: torch.Tensor | None = None) -> None:
        """Adds a batch of episodes.

        Ignored pixels are removed from both prediction and ground truth before counting, as in HSNet's
        evaluator (which sets them to 255 in both, outside its two-bin histograms): they count in neither
        the foreground nor the background intersection and union.

        Args:
            pred: predicted query masks ``(B, H, W)`` (bool).
            target: ground-truth query masks ``(B, H, W)`` (bool).
            class_ids: the episodes' class ids ``(B,)``.
            ignore: pixels to leave out ``(B, H, W)`` (e.g. PASCAL's 255 boundary), or ``None``.

        Raises:
            ValueError: shapes differ, or an ignored pixel is marked foreground in ``target``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.bool(), target.bool()
        if ignore is None:
            valid = torch.ones_like(target)
        else:
            if ignore.shape != target.shape:
                raise ValueError(f"ignore mask {tuple(ignore.shape)} and target {tuple(target.shape)} differ in shape")
            ignore = ignore.bool().to(target.device)
            if (ignore & target).any():  # HSNet asserts the same: a pixel is either labelled or ignored
                raise ValueError(f"{int((ignore & target).sum())} ignored pixels are foreground in the target")
            valid = ~ignore
        class_ids = torch.as_tensor(class_ids, device=pred.device).long().flatten()
        for fg, (p, t) in enumerate(((~pred, ~target), (pred, target))):
            inter = (p & t & valid).flatten(1).sum(1).double()
            union = ((p | t) & valid).flatten(1).sum(1).double()
            self.intersection[fg].index_add_(0, class_ids, inter)
            self.union[fg].index_add_(0, class_ids, union)
        self.episodes.index_add_(0, class_ids, torch.ones_like(class_ids))

    def compute(self) -> dict[str, torch.Tensor]:
        seen = self.episodes > 0
        iou = self.intersection[1, seen] / self.union[1, seen].clamp(min=1)
        fb = self.intersection[:, seen].sum(1) / self.union[:, seen].sum(1).clamp(min=1)
        return {"miou": iou.mean(), "fbiou": fb.mean()}


def masked_average(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average pooling: ``(N, C, h, w)`` features, ``(N, H, W)`` masks → ``(N, C)``.

    Masks are brought to the feature resolution by area interpolation, so they act as soft weights.
    """
    weights = F.interpolate(masks[:, None].float(), size=features.shape[-2:], mode="area")
    return (features * weights).sum((2, 3)) / weights.sum((2, 3)).clamp(min=1e-6)


def dense_features(extractor: FeatureExtractor) -> Callable[..., torch.Tensor]:
    """``(images, indices=None)`` → ``(N, C, h, w)``: every tap of a per-pixel extractor upsampled to one
    size and concatenated (``indices`` seed each image's noise, see :meth:`FeatureExtractor.forward`).

    A grey-scale backbone (one input channel, like the digits U-Net) is given the images' luminance.
    """
    if not isinstance(extractor.readout, PerPixel) or extractor.readout.output_fmt != "NCHW":
        raise TypeError("dense features need a PerPixel readout with output_fmt='NCHW'")
    grey = extractor.backbone.image_channels == 1

    def run(images: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
        if grey and images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        return concat_features(extractor(images, indices))

    return run


class FeatureCache:
    """Remembers the features of every image seen, keyed by the image's bytes.

    Episodes reuse images (a scene is the query of one episode and the support of others), so an
    evaluation over many episodes computes each image's features once. The noise of an image's
    extraction is seeded by its content digest, so its features do not depend on which episode or batch
    first asked for them.

    Args:
        features: ``(images, indices)`` → ``(N, C, h, w)`` (e.g. :func:`dense_features`).
    """

    def __init__(self, features: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> None:
        self.features = features
        self.store: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.store)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
                for x in images]
        missing = {k: i for i, k in enumerate(keys) if k not in self.store}  # dict: an image twice is computed once
        if missing:
            rows = list(missing.values())
            seeds = [int.from_bytes(k[:7], "little") for k in missing]
            for k, f in zip(missing, self.features(images[rows], seeds), strict=True):
                self.store[k] = f
        return torch.stack([self.store[k] for k in keys])


def _check_episode(support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> None:
    if support.ndim != 4 or support.shape[0] == 0:
        raise ValueError(f"support must be (k >= 1, C, H, W), got {tuple(support.shape)}")
    if support_mask.shape != (support.shape[0], *support.shape[-2:]):
        k, _, h, w = support.shape
        raise ValueError(f"support masks {tuple(support_mask.shape)} do not match the support images "
                         f"{tuple(support.shape)}: expected ({k}, {h}, {w})")
    empty = [i for i, m in enumerate(support_mask) if not m.any()]
    if empty:
        raise ValueError(f"support mask(s) {empty} are empty: a prototype needs foreground pixels")
    if query.ndim != 4 or query.shape[1] != support.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} must be (B, {support.shape[1]}, H, W) like the support")


class PrototypeSegmenter(nn.Module):
    """PANet-style training-free few-shot segmentation.

    Foreground and background prototypes are masked averages of the support features (averaged over
    shots); every query position is scored by ``scale · cos(feature, prototype)`` and the two scores are
    upsampled to the image and compared.

    Args:
        features: images ``(N, 3, H, W)`` → feature maps ``(N, C, h, w)`` (e.g. :func:`dense_features`).
        scale: cosine temperature (PANet uses 20).
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], scale: float = 20.0) -> None:
        super().__init__()
        self.features, self.scale = features, scale

    def forward(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Background/foreground logits ``(B, 2, H, W)`` for ``query`` given ``k`` annotated supports."""
        _check_episode(support, support_mask, query)
        feats = self.features(torch.cat([support, query]))
        fs, fq = feats[: len(support)], feats[len(support):]
        protos = torch.stack([masked_average(fs, ~support_mask).mean(0), masked_average(fs, support_mask).mean(0)])
        sim = F.cosine_similarity(fq[:, None], protos[None, :, :, None, None], dim=2) * self.scale
        return F.interpolate(sim, size=query.shape[-2:], mode="bilinear", align_corners=False)

    def predict(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Binary masks ``(E, H, W)`` of a batch of episodes (see :data:`Predictor`)."""
        return torch.stack([self(support[e], support_mask[e], query[e:e + 1])[0].argmax(0).bool()
                            for e in range(len(query))])


def shot_vote(masks: torch.Tensor) -> torch.Tensor:
    """Per-shot vote for k-shot: sum of per-shot binary masks ``(k, H, W)``, divided by its maximum,
    thresholded at 0.5."""
    total = masks.float().sum(0)
    return total / total.max().clamp(min=1) >= 0.5


def episode_masks(predict: Predictor, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor,
                  vote: bool = False) -> torch.Tensor:
    """Binary query masks ``(E, H, W)`` of a batch of k-shot episodes: one native k-shot pass, or (with
    ``vote`` and ``k > 1``) k one-shot passes merged by :func:`shot_vote`."""
    if not vote or support.shape[1] == 1:
        return predict(support, support_mask, query)
    per_shot = torch.stack([predict(support[:, i:i + 1], support_mask[:, i:i + 1], query)
                            for i in range(support.shape[1])], 1)
    return torch.stack([shot_vote(m) for m in per_shot])


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
    logits, trained with binary cross-entropy plus Dice. The mask is not noised: at ᾱ = 0 the paper's
    noisy mask input carries no information.

    Args:
        backbone: a pixel-space ``UNet2DConditionModel`` adapter (e.g. ``sd-unet-scenes``) or folder;
            its weights are fine-tuned.
        timestep: the fixed DDPM index of both passes.
    """

    def __init__(self, backbone: str = "sd-unet-scenes", timestep: int = 0) -> None:
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

    def forward(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Mask logits ``(E, H, W)`` for ``E`` episodes: ``support`` ``(E, k, C, H, W)``, ``support_mask``
        ``(E, k, H, W)``, ``query`` ``(E, C, H, W)``."""
        if support.ndim != 5 or support_mask.shape != (*support.shape[:2], *support.shape[-2:]):
            raise ValueError(f"support {tuple(support.shape)} and masks {tuple(support_mask.shape)} must be "
                             f"(E, k, C, H, W) and (E, k, H, W)")
        for e in range(len(support)):
            _check_episode(support[e], support_mask[e], query[e:e + 1])
        check_images(query, self.backbone.image_channels, "query images")
        check_images(support.flatten(0, 1), self.backbone.image_channels, "support images")
        e, k, c = support.shape[:3]
        mask = (support_mask.float() * 2 - 1)[:, :, None].expand(-1, -1, c, -1, -1)
        s_in = torch.cat([support, mask], 2).flatten(0, 1)
        t = torch.full((e * k,), self.timestep, device=query.device)
        with self.fusion.write(shots=k):
            self.backbone(s_in, t)
        with self.fusion.read():
            return self.backbone(query, t[:e])[:, 0]

    def predict(self, support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Binary masks ``(E, H, W)`` (logit > 0) of a batch of episodes (see :data:`Predictor`)."""
        return self(support, support_mask, query) > 0


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (per episode, averaged)."""
    target = target.float()
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).flatten(1).sum(1) + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


class FewShotSegmentationModule(L.LightningModule):
    """Trains (DiffewS) or just evaluates (prototype baseline) few-shot segmentation on episodes.

    Args:
        method: ``"diffews"`` or ``"prototype"``.
        backbone: backbone name or folder (DiffewS: a pixel ``UNet2DConditionModel``; prototype: any
            backbone whose taps give maps).
        layers: prototype taps.
        timesteps: prototype timesteps (DiffewS uses the first).
        feature_size: side of the prototype's per-pixel features.
        num_classes: class-id space of the metric.
        vote: k-shot by per-shot vote (k one-shot predictions, :func:`shot_vote`) instead of one
            native k-shot pass.
        lr: AdamW learning rate (DiffewS).
    """

    def __init__(self, method: str = "diffews", backbone: str = "sd-unet-scenes", layers: list[str] | None = None,
                 timesteps: list[int] | None = None, feature_size: int = 16, num_classes: int = 20,
                 vote: bool = False, lr: float = 1e-4) -> None:
        super().__init__()
        if method not in ("diffews", "prototype"):
            raise ValueError(f"method must be 'diffews' or 'prototype', got {method!r}")
        self.save_hyperparameters()
        timesteps = timesteps or [0]
        if method == "diffews":
            self.model: nn.Module = DiffewS(backbone, timesteps[0])
        else:
            from difffeat.backbones import create_backbone

            extractor = FeatureExtractor(create_backbone(backbone), layers or ["up_blocks.1"], timesteps,
                                         readout=PerPixel(feature_size))
            self.model = PrototypeSegmenter(dense_features(extractor))
            self.extractor = extractor  # registered, so it moves with the module
        self.method, self.vote, self.lr = method, vote, lr
        self.val_iou, self.test_iou = FewShotIoU(num_classes), FewShotIoU(num_classes)

    def predict_masks(self, batch: dict[str, Any]) -> torch.Tensor:
        """Binary query masks ``(E, H, W)`` of a batch of episodes."""
        return episode_masks(self.model.predict, batch["support"], batch["support_mask"], batch["query"], self.vote)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.method != "diffews":
            raise RuntimeError("the prototype baseline is training-free: run `difffeat test` on it")
        loss = mask_loss(self.model(batch["support"], batch["support_mask"], batch["query"]), batch["query_mask"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_iou.update(self.predict_masks(batch), batch["query_mask"], batch["class_id"],
                               batch.get("query_ignore"))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.test_iou.update(self.predict_masks(batch), batch["query_mask"], batch["class_id"],
                               batch.get("query_ignore"))

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_iou, "val")

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_iou, "test")

    def _log_scores(self, metric: FewShotIoU, prefix: str) -> None:
        """Logs the protocol's scores once per epoch: intersections and unions are summed over *all*
        episodes first (a mean of per-batch scores would not be the protocol's mIoU)."""
        scores = metric.compute()
        self.log_dict({f"{prefix}/miou": scores["miou"].float(), f"{prefix}/fbiou": scores["fbiou"].float()},
                      prog_bar=True)
        metric.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
