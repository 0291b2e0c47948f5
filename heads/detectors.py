"""Downstream torchvision detectors trained on difffeat COCO folders, scored by torchmetrics' COCO mAP.

The detectors users already run, unchanged: torchvision's ``FCOS`` or ``RetinaNet`` on a small backbone,
fed by :class:`~difffeat.data.coco.CocoDetection` (real, synthesized, or both concatenated), evaluated
with ``torchmetrics.detection.MeanAveragePrecision`` (the pycocotools backend: COCO's own definition).

Changed for CPU scale, with the reason: a ResNet-18 from random initialisation (no pretrained weights:
nothing is downloaded, and an ImageNet start would hide what the training images contribute) with an FPN
of width 64 on strides 4, 8, 16 and 32 (the scenes are 64 px with objects of 7–29 px; torchvision's
strides 8–128 would put every object below one cell of the coarse levels); FCOS sizes per level equal to
the stride (torchvision's default relation); images are not resized (``min_size = max_size =`` the image
side); AdamW with warm-up and a cosine decay for a fixed number of steps, so runs on datasets of
different sizes get the same compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from difffeat.data.coco import CocoDetection, collate_detection

__all__ = ["DETECTORS", "build_detector", "coco_datasets", "detect", "evaluate_map", "train_detector"]


def _backbone(width: int, seed: int) -> nn.Module:
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = resnet18(weights=None)
        return BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2"}, [64, 128, 256], width)


#: the strides of the backbone's levels (layer1, layer2, layer3, and the FPN's max-pool level)
STRIDES = (4, 8, 16, 32)


def _fcos(num_classes: int, image_size: int, width: int, seed: int) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return FCOS(_backbone(width, seed), num_classes, min_size=image_size, max_size=image_size,
                    image_mean=[0.5] * 3, image_std=[0.25] * 3, anchor_generator=anchors, score_thresh=0.05,
                    detections_per_img=100)


def _retinanet(num_classes: int, image_size: int, width: int, seed: int) -> nn.Module:
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in (8, 16, 32, 64))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return RetinaNet(_backbone(width, seed), num_classes, min_size=image_size, max_size=image_size,
                         image_mean=[0.5] * 3, image_std=[0.25] * 3, anchor_generator=anchors, score_thresh=0.05,
                         detections_per_img=100)


#: detector constructors by name: ``(num_classes, image_size, width, seed) -> model``
DETECTORS: dict[str, Callable[..., nn.Module]] = {"fcos": _fcos, "retinanet": _retinanet}


def build_detector(name: str, num_classes: int, image_size: int = 64, width: int = 64, seed: int = 0) -> nn.Module:
    """A randomly initialised (seeded) torchvision detector.

    Args:
        name: a key of :data:`DETECTORS`.
        num_classes: object classes (labels ``0 … K-1``; these sigmoid heads need no background class).
        image_size: side of the (square) training images; they are not resized.
        width: FPN width.
        seed: initialisation seed.

    Raises:
        KeyError: an unknown name, listing the valid ones.
    """
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; valid: {sorted(DETECTORS)}")
    return DETECTORS[name](num_classes, image_size, width, seed)


def coco_datasets(roots: Sequence[str | Path]) -> tuple[Dataset, list[str]]:
    """The COCO folders ``roots`` as one dataset, and their category names.

    Raises:
        ValueError: no folder, or folders whose categories differ (named).
    """
    if not roots:
        raise ValueError("give at least one COCO folder")
    sets = [CocoDetection(r) for r in roots]
    for r, s in zip(roots, sets, strict=True):
        if s.categories != sets[0].categories:
            raise ValueError(f"{r} has categories {s.categories}, {roots[0]} has {sets[0].categories}; train on "
                             f"folders of one label set")
    return (sets[0] if len(sets) == 1 else ConcatDataset(sets)), sets[0].categories


def _to_torchvision(batch: dict[str, Any], device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    images = [((im + 1) / 2).to(device) for im in batch["image"]]
    targets = [{"boxes": b.to(device).float(), "labels": lb.to(device)} for b, lb in
               zip(batch["boxes"], batch["labels"], strict=True)]
    return images, targets


def train_detector(model: nn.Module, dataset: Dataset, steps: int = 2000, batch_size: int = 8, lr: float = 1e-3,
                   weight_decay: float = 1e-4, warmup: int = 100, seed: int = 0, device: str = "cpu",
                   progress: bool = True) -> list[float]:
    """Trains a torchvision detector for ``steps`` steps on batches drawn with replacement (seeded).

    Args:
        model: from :func:`build_detector`.
        dataset: detection items (:class:`~difffeat.data.coco.CocoDetection` format).
        steps: optimiser steps.
        batch_size: images per step.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps before the cosine decay.
        seed: sampling seed.
        device: where to train.
        progress: show a progress bar.

    Returns:
        The loss of every step.

    Raises:
        ValueError: a non-finite loss (named with its step).
    """
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size, sampler=RandomSampler(dataset, replacement=True,
                                                                   num_samples=steps * batch_size, generator=gen),
                        collate_fn=collate_detection, drop_last=True)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(loader, disable=not progress, desc="detector")
        for step, batch in enumerate(bar):
            images, targets = _to_torchvision(batch, torch.device(device))
            loss = sum(model(images, targets).values())
            if not torch.isfinite(loss):
                raise ValueError(f"the detector's loss is {float(loss)} at step {step}")
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def detect(model: nn.Module, dataset: Dataset, batch_size: int = 16, device: str = "cpu"
           ) -> list[dict[str, torch.Tensor]]:
    """Detections of every image of ``dataset``: ``{"boxes" x0, y0, x1, y1, "scores", "labels"}`` per image."""
    model.to(device).eval()
    out = []
    for batch in DataLoader(dataset, batch_size, collate_fn=collate_detection):
        images, _ = _to_torchvision(batch, torch.device(device))
        out += [{k: v.cpu() for k, v in p.items()} for p in model(images)]
    return out


def evaluate_map(predictions: Sequence[dict[str, torch.Tensor]], dataset: Dataset) -> dict[str, float]:
    """COCO box mAP of ``predictions`` on ``dataset`` (torchmetrics, pycocotools backend).

    Returns:
        ``{"map": mAP@[.5:.95], "map_50": mAP@.5}`` in ``[0, 1]`` (``-1`` where COCO defines none).

    Raises:
        ValueError: a prediction count different from the dataset's length.
    """
    from torchmetrics.detection import MeanAveragePrecision

    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} images")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    targets = []
    for i in range(len(dataset)):
        item = dataset[i]
        targets.append({"boxes": item["boxes"].float(), "labels": item["labels"]})
    metric.update(list(predictions), targets)
    result = metric.compute()
    return {"map": float(result["map"]), "map_50": float(result["map_50"])}
