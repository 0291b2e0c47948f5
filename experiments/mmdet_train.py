"""Trains and tests an mmdet 3.x detector on difffeat COCO folders with mmdet's own runner and ``CocoMetric``.

The config (default ``configs/mmdet/fcos_r18_difffeat.py``) names the model and schedule; this script
points its ``CocoDataset`` entries at the folders, sets ``metainfo.classes`` from the json (category names
in id order, so mmdet's ``cat2label`` equals the contiguous labels of :class:`~difffeat.data.coco.CocoDetection`)
and ``num_classes``, and runs ``mmengine.runner.Runner`` (train, then test). ``coco_metric`` scores given
predictions with mmdet's ``CocoMetric`` alone, so the same predictions can be scored by torchmetrics too.

    python -m experiments.mmdet_train --train REAL [SYNTH] --test TEST --work-dir DIR [--iters 2000]

mmdet 3.3 needs mmcv < 2.2 with compiled ops (``../shared/wheels/README.md`` says how to install or build it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difffeat.data.coco import ANNOTATIONS, load_coco

__all__ = ["DEFAULT_CONFIG", "coco_metric", "configure", "main", "train_and_test"]

DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "mmdet" / "fcos_r18_difffeat.py"


def _classes(roots: Sequence[str | Path]) -> tuple[str, ...]:
    names = []
    for r in roots:
        cats = sorted(load_coco(r)["categories"], key=lambda c: c["id"])
        names.append(tuple(c["name"] for c in cats))
    if any(n != names[0] for n in names):
        raise ValueError(f"the folders {list(map(str, roots))} have different categories: {names}")
    return names[0]


def configure(train_roots: Sequence[str | Path], test_root: str | Path, work_dir: str | Path,
              config: str | Path = DEFAULT_CONFIG, iters: int | None = None, batch_size: int | None = None,
              seed: int = 0) -> Any:
    """The mmengine ``Config`` of ``config`` pointed at difffeat COCO folders.

    Args:
        train_roots: COCO folders to train on (concatenated).
        test_root: the COCO folder to test on.
        work_dir: mmengine's work directory (logs, checkpoint).
        config: an mmdet config whose train dataset is a ``ConcatDataset`` of ``CocoDataset``.
        iters: training iterations (default: the config's).
        batch_size: training batch size (default: the config's).
        seed: mmengine's randomness seed.

    Raises:
        ValueError: folders with different categories.
    """
    from mmengine.config import Config

    classes = _classes([*train_roots, test_root])
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    cfg.model.bbox_head.num_classes = len(classes)
    template = cfg.train_dataloader.dataset.datasets[0]
    datasets = []
    for r in train_roots:
        d = copy.deepcopy(template)
        d.data_root, d.metainfo = str(r), {"classes": classes}
        datasets.append(d)
    cfg.train_dataloader.dataset.datasets = datasets
    cfg.test_dataloader = copy.deepcopy(cfg.test_dataloader)
    cfg.test_dataloader.dataset.data_root = str(test_root)
    cfg.test_dataloader.dataset.metainfo = {"classes": classes}
    cfg.test_evaluator = copy.deepcopy(cfg.test_evaluator)
    cfg.test_evaluator.ann_file = str(Path(test_root) / ANNOTATIONS)
    # the test set is scored once, after training (no validation during it: it is the held-out set)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    if batch_size is not None:
        cfg.train_dataloader.batch_size = batch_size
    if iters is not None:
        cfg.train_cfg.max_iters = iters
        cfg.train_cfg.val_interval = iters + 1
        cfg.default_hooks.checkpoint.interval = iters
        warm = min(100, max(1, iters // 10))
        cfg.param_scheduler = [
            {"type": "LinearLR", "start_factor": 0.01, "by_epoch": False, "begin": 0, "end": warm},
            {"type": "CosineAnnealingLR", "by_epoch": False, "begin": warm, "end": iters,
             "T_max": max(1, iters - warm)}]
    cfg.randomness = {"seed": seed, "deterministic": False}
    return cfg


def train_and_test(train_roots: Sequence[str | Path], test_root: str | Path, work_dir: str | Path,
                   config: str | Path = DEFAULT_CONFIG, iters: int | None = None, batch_size: int | None = None,
                   seed: int = 0) -> dict[str, float]:
    """Trains with mmengine's ``Runner`` and tests with mmdet's ``CocoMetric``.

    Returns:
        ``{"map": bbox_mAP, "map_50": bbox_mAP_50}`` in ``[0, 1]``.
    """
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner

    register_all_modules()
    cfg = configure(train_roots, test_root, work_dir, config, iters, batch_size, seed)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return _scores(runner.test())


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    """mAP and mAP@.5 of CocoMetric's result; it returns ``{}`` when no image has a detection: AP 0 then."""
    if "coco/bbox_mAP" not in metrics:
        return {"map": 0.0, "map_50": 0.0}
    return {"map": float(metrics["coco/bbox_mAP"]), "map_50": float(metrics["coco/bbox_mAP_50"])}


def coco_metric(test_root: str | Path, predictions: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """mmdet's ``CocoMetric`` (bbox) of ``predictions`` on the COCO folder ``test_root``.

    Args:
        test_root: the COCO folder (its json is the ground truth).
        predictions: per image of the json, in its order: ``boxes`` ``x0, y0, x1, y1``, ``scores``, ``labels``
            (contiguous: position in the categories sorted by id).

    Returns:
        ``{"map", "map_50"}`` in ``[0, 1]``.
    """
    from mmdet.evaluation import CocoMetric

    data = load_coco(test_root)
    if len(predictions) != len(data["images"]):
        raise ValueError(f"{len(predictions)} predictions for {len(data['images'])} images of {test_root}")
    metric = CocoMetric(ann_file=str(Path(test_root) / ANNOTATIONS), metric="bbox")
    metric.dataset_meta = {"classes": _classes([test_root])}
    samples = []
    for im, p in zip(data["images"], predictions, strict=True):
        samples.append({"img_id": im["id"], "ori_shape": (im["height"], im["width"]),
                        "pred_instances": {"bboxes": p["boxes"].float(), "scores": p["scores"].float(),
                                           "labels": p["labels"].long()}})
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    metric.process({}, samples)
    return _scores(metric.evaluate(len(samples)))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Command line: train on ``--train`` folders, test on ``--test``, print and return the COCO metrics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", nargs="+", required=True, help="difffeat COCO folders to train on")
    parser.add_argument("--test", required=True, help="the COCO folder to test on")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = train_and_test(args.train, args.test, args.work_dir, args.config, args.iters, args.batch_size, args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
