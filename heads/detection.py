"""Detection adapter on frozen diffusion features (DiffusionEngine's detection adapter, at CPU scale).

Multi-stride maps of the frozen diffusion U-Net at one timestep, the timestep of the *final* denoising step
of a synthesis pass (:class:`~difffeat.encoder.DiffusionEncoder`), go through a channel mapper (a 1×1
convolution to a common width and GroupNorm per level, as mmdet's ``ChannelMapper``) into a DETR-like
set-prediction head:

* a transformer decoder whose learned queries cross-attend to the flattened maps (2-D sine positions plus
  a learned level embedding);
* per decoder layer, a class head (sigmoid, no background class) and a box head; boxes are refined from
  a learned reference box per query (Deformable DETR's ``inverse_sigmoid(reference) + delta``), every
  layer supervised (auxiliary losses);
* Hungarian matching of queries to ground truth by ``scipy.optimize.linear_sum_assignment`` on the
  reference's costs: class 2 (the focal-loss form of Deformable DETR), L1 5 on normalised ``cx, cy, w, h``,
  GIoU 2; losses focal (α 0.25, γ 2) × 2, L1 × 5, GIoU × 2, normalised by the number of boxes.

Changed for CPU scale, with the reason: 20 queries, width 64, 2 decoder layers, no encoder layers (64-px
scenes hold at most a handful of objects; the reference uses 300 queries and a deformable encoder); the
positions are added to the memory once instead of to the keys of every layer (PyTorch's decoder layer
takes no separate key positions); no dropout (tiny data, short schedules).

``head="dense"`` swaps in an FCOS-like one-stage head (:class:`DenseDetectionHead`: torchvision's
``FCOSHead`` with its own matching, losses and decoding) on the same mapped levels. A dense head shares
its weights over locations and matches by position, which needs fewer labelled images than learning
object queries from scratch; at this scale that may matter more than set prediction's freedom from NMS.
The class default stays the set head (the reference's choice); ``configs/detection_adapter.yaml`` picks the
dense head, which trained better at this scale (0.2 vs 8.8 mAP on held-out scenes after the same 1500 steps on
50 scenes), and ``experiments/detection_synthesis.py`` trains both and reports their mAP, so the choice is measured.

Features are a pure function of the image (content-seeded noise), so the module memoises them per image
(``cache_features``): after the first epoch over a few labelled images no backbone forward is needed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from difffeat.encoder import DiffusionEncoder
from heads.base import FrozenPartState

__all__ = [
    "HEADS",
    "ChannelMapper",
    "DenseDetectionHead",
    "DetectionAdapter",
    "SetDetectionHead",
    "fit_adapter",
    "hungarian_match",
    "match_cost",
    "resize_taps",
    "set_criterion",
    "synthesize_from_checkpoint",
]


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum-cost one-to-one assignment of rows (queries) to columns (targets).

    Args:
        cost: ``(Q, N)`` with ``Q >= N`` (every target gets a query).

    Returns:
        ``(query indices, target indices)``, each ``(N,)`` int64, sorted by query.

    Raises:
        ValueError: not 2-D, more targets than queries, or NaN/Inf costs.
    """
    if cost.ndim != 2:
        raise ValueError(f"cost must be (queries, targets), got shape {tuple(cost.shape)}")
    if cost.shape[1] > cost.shape[0]:
        raise ValueError(f"{cost.shape[1]} targets but only {cost.shape[0]} queries; raise num_queries")
    c = cost.detach().cpu().double().numpy()
    if not np.isfinite(c).all():
        raise ValueError("matching costs hold NaN or Inf (diverged predictions?)")
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def match_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
               class_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Deformable DETR's matching cost of one image.

    Args:
        logits: ``(Q, K)`` class logits.
        boxes: ``(Q, 4)`` predicted ``cx, cy, w, h`` in ``[0, 1]``.
        labels: ``(N,)`` target classes.
        target_boxes: ``(N, 4)`` target ``cx, cy, w, h`` in ``[0, 1]``.
        class_weight: weight of the focal class cost.
        l1_weight: weight of the L1 box cost.
        giou_weight: weight of the (negative) GIoU cost.
        alpha: focal α.
        gamma: focal γ.

    Returns:
        ``(Q, N)`` costs.
    """
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    cost_class = pos[:, labels] - neg[:, labels]
    cost_l1 = torch.cdist(boxes, target_boxes, p=1)
    cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
    return class_weight * cost_class + l1_weight * cost_l1 + giou_weight * cost_giou


def set_criterion(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  class_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0, alpha: float = 0.25,
                  gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """The set-prediction loss of one decoder layer's outputs.

    Args:
        logits: ``(B, Q, K)``.
        boxes: ``(B, Q, 4)`` ``cx, cy, w, h`` in ``[0, 1]``.
        targets: per image ``(labels (N,), boxes (N, 4) cx, cy, w, h in [0, 1])``.
        class_weight: weight of the focal loss (and of its matching cost).
        l1_weight: weight of the L1 loss (and cost).
        giou_weight: weight of the GIoU loss (and cost).
        alpha: focal α.
        gamma: focal γ.

    Returns:
        ``{"class", "l1", "giou"}`` weighted losses, each averaged over the batch's boxes.
    """
    weights = {"class_weight": class_weight, "l1_weight": l1_weight, "giou_weight": giou_weight,
               "alpha": alpha, "gamma": gamma}
    onehot = torch.zeros_like(logits)
    matched_pred, matched_tgt = [], []
    for b, (labels, tboxes) in enumerate(targets):
        if len(labels) == 0:
            continue
        with torch.no_grad():
            q, n = hungarian_match(match_cost(logits[b], boxes[b], labels, tboxes, **weights))
        onehot[b, q, labels[n]] = 1
        matched_pred.append(boxes[b, q])
        matched_tgt.append(tboxes[n])
    num = max(1, sum(len(t[0]) for t in targets))
    loss_class = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num
    if matched_pred:
        pred, tgt = torch.cat(matched_pred), torch.cat(matched_tgt)
        loss_l1 = F.l1_loss(pred, tgt, reduction="sum") / num
        giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
        loss_giou = (1 - giou).sum() / num
    else:
        loss_l1 = loss_giou = boxes.sum() * 0
    return {"class": class_weight * loss_class, "l1": l1_weight * loss_l1, "giou": giou_weight * loss_giou}


class ChannelMapper(nn.Module):
    """Each level to a common width: 1×1 convolution and GroupNorm (mmdet's ``ChannelMapper``).

    Args:
        in_channels: channels of each level.
        width: the common width.
        groups: GroupNorm groups.
    """

    def __init__(self, in_channels: Sequence[int], width: int = 64, groups: int = 8) -> None:
        super().__init__()
        self.levels = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 1), nn.GroupNorm(groups, width))
                                    for c in in_channels)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One ``(B, width, h_i, w_i)`` map per level."""
        if len(maps) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps, got {len(maps)}")
        return [level(m) for level, m in zip(self.levels, maps, strict=True)]


def _sine_positions(h: int, w: int, width: int, device: torch.device) -> torch.Tensor:
    """DETR's normalised 2-D sine position encoding, ``(h·w, width)``."""
    n = width // 4
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    freq = 10000 ** (torch.arange(n, device=device, dtype=torch.float32) / n)
    py, px = ys[:, None] / freq, xs[:, None] / freq
    py = torch.cat([py.sin(), py.cos()], 1)[:, None, :].expand(h, w, 2 * n)
    px = torch.cat([px.sin(), px.cos()], 1)[None, :, :].expand(h, w, 2 * n)
    pos = torch.cat([py, px], -1).reshape(h * w, 4 * n)
    return F.pad(pos, (0, width - 4 * n))


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class SetDetectionHead(nn.Module):
    """A DETR-like decoder: queries cross-attend to the mapped levels; class and box per query and layer.

    Args:
        in_channels: channels of each input level.
        num_classes: object classes (no background class: sigmoid scores).
        width: model width.
        num_queries: object queries (at most this many detections per image).
        num_layers: decoder layers.
        heads: attention heads.
        groups: GroupNorm groups of the channel mapper.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 64, num_queries: int = 20,
                 num_layers: int = 2, heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.mapper = ChannelMapper(in_channels, width, groups)
        self.level_embed = nn.Parameter(torch.zeros(len(in_channels), width))
        self.query = nn.Embedding(num_queries, width)
        side = math.ceil(math.sqrt(num_queries))  # reference boxes spread over the image
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
        ref = torch.cat([(grid[:num_queries] + 0.5) / side, torch.full((num_queries, 2), 0.3)], 1)
        self.reference = nn.Parameter(_inverse_sigmoid(ref))
        self.layers = nn.ModuleList(nn.TransformerDecoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.class_head = nn.Linear(width, num_classes)
        self.box_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                      nn.Linear(width, 4))
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))  # focal prior π = 0.01
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)
        nn.init.normal_(self.level_embed, std=0.02)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer (last = the prediction): ``(logits (B, Q, K), boxes (B, Q, 4) cx, cy, w, h)``."""
        mapped = self.mapper(maps)
        memory = torch.cat([m.flatten(2).transpose(1, 2) + _sine_positions(*m.shape[-2:], m.shape[1], m.device)
                            + self.level_embed[i] for i, m in enumerate(mapped)], 1)
        b = memory.shape[0]
        tgt = self.query.weight[None].expand(b, -1, -1)
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory)
            h = self.norm(tgt)
            boxes = (self.reference[None] + self.box_head(h)).sigmoid()
            outputs.append((self.class_head(h), boxes))
        return outputs

    def loss(self, maps: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
             image_size: tuple[int, int], **weights: float) -> dict[str, torch.Tensor]:
        """Set loss summed over decoder layers (auxiliary losses), by term.

        Args:
            maps: the levels.
            boxes: per image ``(N, 4)`` ``x0, y0, x1, y1`` pixels.
            labels: per image ``(N,)``.
            image_size: ``(H, W)``.
            **weights: :func:`set_criterion`'s weights.
        """
        h, w = image_size
        scale = maps[0].new_tensor([w, h, w, h])
        targets = [(lb, box_convert(b.float(), "xyxy", "cxcywh") / scale) for b, lb in zip(boxes, labels, strict=True)]
        terms: dict[str, torch.Tensor] = {}
        for logits, pred in self(maps):
            for k, v in set_criterion(logits, pred, targets, **weights).items():
                terms[k] = terms.get(k, 0) + v
        return terms

    @torch.no_grad()
    def predict(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int], score_threshold: float | None
                ) -> list[dict[str, torch.Tensor]]:
        """The last layer's top ``num_queries`` (query, class) pairs per image, boxes in pixels."""
        logits, boxes = self(maps)[-1]
        h, w = image_size
        scale = boxes.new_tensor([w, h, w, h])
        results = []
        for lg, bx in zip(logits, boxes, strict=True):
            scores, flat = lg.sigmoid().flatten().topk(min(self.num_queries, lg.numel()))
            q, cls = flat // lg.shape[1], flat % lg.shape[1]
            xyxy = box_convert(bx[q], "cxcywh", "xyxy") * scale
            xyxy = torch.stack([xyxy[:, 0].clamp(0, w), xyxy[:, 1].clamp(0, h), xyxy[:, 2].clamp(0, w),
                                xyxy[:, 3].clamp(0, h)], 1)
            keep = scores > score_threshold if score_threshold is not None else torch.ones_like(scores, dtype=bool)
            results.append({"boxes": xyxy[keep], "scores": scores[keep], "labels": cls[keep]})
        return results


class _NoBackbone(nn.Module):
    """Stands where torchvision's FCOS expects a backbone: the dense head is fed maps, never images."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels


class DenseDetectionHead(nn.Module):
    """An FCOS-like dense head on the mapped levels: torchvision's ``FCOSHead``, matching, losses and decoding.

    Per location: class scores (sigmoid focal loss), ``l, t, r, b`` distances (GIoU loss) and centerness
    (BCE); positives by FCOS's centre sampling and per-level size ranges ``[4s, 8s]`` of torchvision's
    ``FCOS``, whose ``compute_loss`` and ``postprocess_detections`` (score > 0.05, NMS 0.6) are used as they
    are; only its image transform and backbone are bypassed, as the levels come from the diffusion taps.

    Args:
        in_channels: channels of each input level.
        num_classes: object classes.
        strides: image stride of each level.
        width: common width (channel mapper output and head; a multiple of 32).
        groups: GroupNorm groups of the channel mapper.
        num_convs: convolutions of each FCOS tower (torchvision's default 4; 2 at this scale).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, strides: Sequence[int], width: int = 64,
                 groups: int = 8, num_convs: int = 2) -> None:
        super().__init__()
        from torchvision.models.detection import FCOS
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.fcos import FCOSHead

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width % 32:
            raise ValueError(f"the dense head's width must be a multiple of 32 (FCOSHead's GroupNorm has 32 groups), "
                             f"got {width}")
        self.mapper = ChannelMapper(in_channels, width, groups)
        anchors = AnchorGenerator(tuple((int(s),) for s in strides), ((1.0,),) * len(strides))
        self.fcos = FCOS(_NoBackbone(width), num_classes, anchor_generator=anchors,
                         head=FCOSHead(width, 1, num_classes, num_convs=num_convs), score_thresh=0.05,
                         nms_thresh=0.6, detections_per_img=100)

    def _run(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> tuple[Any, ...]:
        from torchvision.models.detection.image_list import ImageList

        features = self.mapper(maps)
        b = features[0].shape[0]
        images = ImageList(features[0].new_empty((b, 0, *image_size)), [tuple(image_size)] * b)
        return features, self.fcos.head(features), self.fcos.anchor_generator(images, features)

    def loss(self, maps: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
             image_size: tuple[int, int], **_weights: float) -> dict[str, torch.Tensor]:
        """FCOS's ``classification``, ``bbox_regression`` and ``bbox_ctrness`` losses."""
        features, outputs, anchors = self._run(maps, image_size)
        targets = [{"boxes": b.float(), "labels": lb} for b, lb in zip(boxes, labels, strict=True)]
        per_level = [f.shape[2] * f.shape[3] for f in features]
        return self.fcos.compute_loss(targets, outputs, anchors, per_level)

    @torch.no_grad()
    def predict(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int], score_threshold: float | None
                ) -> list[dict[str, torch.Tensor]]:
        """FCOS's decoding and NMS; detections above ``score_threshold`` (``None``: FCOS's own 0.05)."""
        features, outputs, anchors = self._run(maps, image_size)
        per_level = [f.shape[2] * f.shape[3] for f in features]
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        dets = self.fcos.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                [tuple(image_size)] * len(anchors))
        if score_threshold is None:
            return dets
        return [{k: v[d["scores"] > score_threshold] for k, v in d.items()} for d in dets]


#: the adapter's detection heads by name: ``(level channels, classes, level strides, adapter args) -> head``
HEADS: dict[str, Any] = {
    "set": lambda c, k, s, a: SetDetectionHead(c, k, a["width"], a["num_queries"], a["num_layers"]),
    "dense": lambda c, k, s, a: DenseDetectionHead(c, k, s, a["width"]),
}


def resize_taps(maps: Sequence[torch.Tensor], strides: Sequence[int], size: tuple[int, int]) -> list[torch.Tensor]:
    """Tap maps resized to ``size / stride`` as :class:`~difffeat.encoder.DiffusionEncoder` resizes them.

    Area averaging down, bilinear up.
    """
    out = []
    for m, s in zip(maps, strides, strict=True):
        target = (size[0] // s, size[1] // s)
        if tuple(m.shape[-2:]) != target:
            shrink = m.shape[-2] > target[0]
            m = F.interpolate(m, size=target, mode="area") if shrink else F.interpolate(
                m, size=target, mode="bilinear", align_corners=False)
        out.append(m)
    return out


class DetectionAdapter(FrozenPartState, L.LightningModule):
    """The detection adapter's LightningModule: frozen encoder taps → :class:`SetDetectionHead` (or the dense one).

    It also serves synthesis (:func:`difffeat.synthesize.synthesize`) as its box predictor: :attr:`backbone`,
    :attr:`layers`, :attr:`timestep`, :attr:`categories` and :meth:`predict_taps`.

    Args:
        backbone: a registered backbone name or a diffusers folder (the diffusion model that synthesizes).
        layers: taps (any order; used by increasing stride).
        timestep: the DDPM timestep of the features: synthesis ends its denoising loop at this timestep.
        categories: class names (the seed set's), in label order.
        output_strides: strides the taps are resized to (see :class:`~difffeat.encoder.DiffusionEncoder`).
        head: a :data:`HEADS` name: ``"set"`` (the reference's DETR-like head) or ``"dense"`` (FCOS-like).
        width: head width.
        num_queries: object queries (set head).
        num_layers: decoder layers (set head).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        score_threshold: the lowest score kept by :meth:`predict` (validation keeps every detection).
        class_weight: focal loss / class cost weight (set head).
        l1_weight: L1 weight (set head).
        giou_weight: GIoU weight (set head).
        seed: noise seed of the features.
        cache_features: memoise features per image content (valid: content-seeded noise, no augmentation).
        backbone_kwargs: extra ``create_backbone`` arguments.

    Raises:
        ValueError: no categories, or repeated names.
        KeyError: an unknown head name.
    """

    frozen_prefix = "encoder."

    def __init__(self, backbone: str, layers: list[str], timestep: int, categories: list[str],
                 output_strides: list[int] | None = None, head: str = "set", width: int = 64, num_queries: int = 20,
                 num_layers: int = 2,
                 lr: float = 5e-4, weight_decay: float = 1e-4, score_threshold: float = 0.3,
                 class_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0, seed: int = 0,
                 cache_features: bool = True, backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not categories or len(set(categories)) != len(categories):
            raise ValueError(f"categories must be distinct class names, got {categories}")
        self.save_hyperparameters()
        self.encoder = DiffusionEncoder(backbone, layers, timestep, output_strides=output_strides, seed=seed,
                                        backbone_kwargs=backbone_kwargs)
        self.encoder.backbone.requires_grad_(False)
        if head not in HEADS:
            raise KeyError(f"unknown detection head {head!r}; valid: {sorted(HEADS)}")
        self.head = HEADS[head](self.encoder.out_channels[1:], len(categories), self.encoder.strides,
                                {"width": width, "num_queries": num_queries, "num_layers": num_layers})
        self.categories = list(categories)
        self.weights = {"class_weight": class_weight, "l1_weight": l1_weight, "giou_weight": giou_weight}
        self._features: dict[str, list[torch.Tensor]] | None = {} if cache_features else None
        self._map: Any = None

    # ------------------------------------------------------------------ predictor interface (synthesis)
    @property
    def backbone(self) -> Any:
        """The frozen diffusion backbone the features come from."""
        return self.encoder.backbone

    @property
    def layers(self) -> list[str]:
        """Tap names, by increasing stride."""
        return list(self.encoder.layers)

    @property
    def timestep(self) -> int:
        """The features' DDPM timestep."""
        return int(self.encoder.timestep)

    def spec(self) -> dict[str, Any]:
        """What makes this predictor's boxes: backbone spec, taps, timestep, categories and head weights."""
        from difffeat.digest import tensor_digest

        return {"backbone": self.backbone.spec(), "layers": self.layers, "strides": list(self.encoder.strides),
                "timestep": self.timestep, "categories": self.categories,
                "head": tensor_digest(self.head.state_dict())}

    @torch.no_grad()
    def predict_taps(self, taps: dict[str, torch.Tensor], image_size: tuple[int, int],
                     score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Boxes from raw tap outputs (recorded during a denoising step at :attr:`timestep`).

        Returns:
            Per image ``{"boxes" (M, 4) x0, y0, x1, y1 pixels, "scores" (M,), "labels" (M,)}``.

        Raises:
            KeyError: a tap is missing (a feature cache that skipped the module at the final step).
        """
        missing = [n for n in self.layers if n not in taps]
        if missing:
            raise KeyError(f"taps {missing} were not recorded at the final step (recorded: {sorted(taps)}); the "
                           f"final denoising step must run the layers the adapter reads")
        maps = resize_taps([taps[n].float() for n in self.layers], self.encoder.strides, image_size)
        return self.head.predict(maps, tuple(image_size), score_threshold)

    # ------------------------------------------------------------------ features and predictions
    def _maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self._features is None:
            return self.encoder(images)[1:]
        keys = [hashlib.blake2b(im.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()
                for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self._features]
        if todo:
            fresh = self.encoder(images[todo])[1:]
            for j, i in enumerate(todo):
                self._features[keys[i]] = [m[j].detach().cpu() for m in fresh]
        return [torch.stack([self._features[k][level] for k in keys]).to(images.device)
                for level in range(len(self.layers))]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The head's input levels for ``(B, 3, H, W)`` images in ``[-1, 1]`` (moved to the module's device)."""
        return self._maps(images.to(self.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections of clean images (boxes in pixels, scores above ``score_threshold``, default the module's)."""
        threshold = self.hparams.score_threshold if score_threshold is None else score_threshold
        return self.head.predict(self(images), tuple(images.shape[-2:]), threshold)

    # ------------------------------------------------------------------ training
    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The head's loss terms and ``"loss"``, their sum."""
        boxes = [b.to(self.device) for b in batch["boxes"]]
        labels = [lb.to(self.device) for lb in batch["labels"]]
        terms = dict(self.head.loss(self(batch["image"]), boxes, labels, tuple(batch["image"].shape[-2:]),
                                    **self.weights))
        terms["loss"] = sum(terms.values())
        return terms

    def on_fit_start(self) -> None:
        """Checks the backbone is frozen."""
        if any(p.requires_grad for p in self.encoder.backbone.parameters()):
            raise RuntimeError("the detection adapter's backbone has trainable parameters")

    def on_train_epoch_start(self) -> None:
        """The frozen backbone back in eval mode."""
        self.encoder.backbone.eval()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One step of the set loss."""
        terms = self.loss(batch)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=len(batch["image"]), prog_bar=False)
        return terms["loss"]

    def on_validation_epoch_start(self) -> None:
        """A fresh COCO mAP over the validation set."""
        from torchmetrics.detection import MeanAveragePrecision

        self._map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss and mAP accumulation (every detection kept, as COCO evaluation expects)."""
        terms = self.loss(batch)
        self.log("val/loss", terms["loss"], batch_size=len(batch["image"]))
        preds = self.head.predict(self(batch["image"]), tuple(batch["image"].shape[-2:]), None)
        self._map.update([{k: v.cpu() for k, v in p.items()} for p in preds],
                         [{"boxes": b.float().cpu(), "labels": lb.cpu()} for b, lb in
                          zip(batch["boxes"], batch["labels"], strict=True)])

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/map`` (mAP@[.5:.95]) and ``val/map_50``."""
        result = self._map.compute()
        self.log("val/map", float(result["map"]))
        self.log("val/map_50", float(result["map_50"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW on the head only."""
        return torch.optim.AdamW(self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def fit_adapter(adapter: DetectionAdapter, dataset: Any, steps: int, batch_size: int = 8, seed: int = 0,
                progress: bool = True) -> list[float]:
    """Trains ``adapter``'s head for ``steps`` steps on a detection dataset (a plain loop, for scripts).

    Args:
        adapter: the module.
        dataset: items as :class:`~difffeat.data.coco.CocoDetection` gives them.
        steps: optimiser steps.
        batch_size: images per step.
        seed: shuffling seed.
        progress: show a progress bar.

    Returns:
        The loss of every step.
    """
    from torch.utils.data import DataLoader, RandomSampler
    from tqdm.auto import tqdm

    from difffeat.data.coco import collate_detection

    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size, sampler=RandomSampler(dataset, replacement=True,
                                                                   num_samples=steps * batch_size, generator=gen),
                        collate_fn=collate_detection, drop_last=True)
    opt = adapter.configure_optimizers()
    adapter.train()
    adapter.encoder.backbone.eval()
    losses = []
    for batch in tqdm(loader, disable=not progress, desc="adapter"):
        loss = adapter.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.head.parameters(), 0.1)
        opt.step()
        losses.append(float(loss.detach()))
    adapter.eval()
    return losses


def synthesize_from_checkpoint(checkpoint: str | Path, seeds: str | Path, out: str | Path, num_images: int,
                               steps: int = 25, strength: tuple[float, float] = (0.4, 0.8),
                               score_threshold: float = 0.3, seed: int = 0, cache_interval: int = 1,
                               cache_branch: int = 0, progress: bool = True) -> dict[str, Any]:
    """``difffeat synthesize``: a trained adapter checkpoint, a seed COCO folder → a synthesized COCO folder.

    Args:
        checkpoint: a Lightning checkpoint of :class:`DetectionAdapter` (its hyper-parameters rebuild it).
        seeds: the labelled seed COCO folder.
        out: output folder.
        num_images: images to synthesize.
        steps: denoising steps of a full-strength pass.
        strength: range strengths are drawn from.
        score_threshold: lowest kept box score.
        seed: synthesis seed.
        cache_interval: DeepCache's ``N`` (one full U-Net step in ``N``; 1 = no cache). The last step of each
            pass always runs in full (``last_full``), so the adapter reads that step's own features.
        cache_branch: DeepCache's skip branch (see :class:`difffeat.cache.DeepCache`).
        progress: show a progress bar.

    Returns:
        The summary of :func:`difffeat.synthesize.synthesize`.
    """
    from difffeat.synthesize import synthesize

    cache = None
    if cache_interval > 1:
        from difffeat.cache import DeepCache

        cache = DeepCache(interval=cache_interval, branch=cache_branch, steps=steps, last_full=True)
    adapter = DetectionAdapter.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True).eval()
    return synthesize(adapter, seeds, out, num_images, steps=steps, strength=strength,
                      score_threshold=score_threshold, seed=seed, cache=cache, progress=progress)
