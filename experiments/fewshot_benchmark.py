"""Few-shot semantic segmentation on the scene benchmark: the episodic protocol, 4 folds, novel classes,
and the controls that say whether a method segments what its support shows.

Scenes: 32×32, 2–4 objects of *distinct* classes each, every object with its own random texture (so only
shape identifies a class), train and test alike (``SCENES``). A query therefore holds several classes and
its target is the episode's class alone. 32 px, not 64: DiffewS with KV fusion at the 1/2-resolution grid
costs about 4× more per training step at 64 px than at 32 on the CPU
(``experiments/results/bench_fewshot_fusion.md``); four folds of two trained models fit only at 32.

Arms, all scored on the same seeded test episodes (fold ``f``'s five novel classes, scenes of another seed
than any training scene), features and weights from one diffusion model: ``sd-unet-scenes-attn2``
pretrained on unlabelled scenes by :file:`configs/ddpm_scenes_attn2.yaml`:

* ``every-object oracle``: the union of the query's ground-truth instance masks, whatever the class, what a
  class-agnostic "segment every object" model reaches at best;
* ``prototype``: the PANet-style baseline (:mod:`heads.fewshot_prototype`);
* ``label transfer``: each query pixel takes the vote of its k nearest support pixels in feature space
  (:mod:`heads.fewshot_transfer`), training-free;
* ``DiffewS``: fine-tuned per fold on base-class episodes in counterfactual pairs (one query, two
  supports of two classes present in it, two targets) with 15 % negative episodes (support class absent,
  empty target);
* ``DiffewS query-only``: the same network, training, episodes and seed, without any support
  (``DiffewS(query_only=True)``): what the support adds;
* ``HSNet-style correlation head`` (:mod:`heads.fewshot_correlation`): a decoder trained on the same
  episodes, steps and seed that sees only query–support cosine statistics of the frozen U-Net's block
  outputs (t = 50), so it cannot ignore its support.

Taps of the training-free arms are chosen per fold and per method on 1-shot episodes of the fold's *base*
classes, among every block output at t ∈ {10, 50, 200}; novel classes never choose anything. The trained
arms train for a fixed number of steps (1000 by default: at 300, DiffewS's pair loss had not left the
query-only model's), with no early stopping.

Why a model ignores its support is measured too: the entropy of DiffewS's fused self-attentions (as a
fraction of uniform) and the share of attention its query tokens give the support's tokens, before and
after fine-tuning (:func:`attention_entropy`). A fused attention that spreads evenly hands every query
token the same average of the support, whatever its content. And whether the features can tell the novel
classes apart at all: a 5-way logistic regression on each test object's masked-average features, beside
the same probe on its silhouette and on its colour (:func:`separability`).

Controls (1-shot, same episodes for every condition): the support of *another novel class* (drawn per
episode), an *empty support mask* (trained models only), and *counterfactual selectivity* on test
queries that hold two novel classes A and B: IoU with A's ground truth given an A-support minus IoU with
B's ground truth given that same A-support (0 for a model that ignores the support). The own-vs-other
gap and the selectivity come with paired bootstrap 95 % intervals (episodes resampled within each fold,
the same resample for both conditions, 2000 replicates, means over folds).

Rerun: ``python -m experiments.fewshot_benchmark`` (writes ``experiments/results/fewshot_benchmark.md``,
``fewshot_benchmark_examples.png`` and ``fewshot_benchmark_losses.png``; finished (arm, fold) results are
cached under ``.cache/difffeat/fewshot`` and reused by a rerun with the same settings).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from difffeat.backbones import create_backbone
from difffeat.data.episodes import FewShotDataModule, FewShotEpisodes
from difffeat.data.scenes import CLASSES, SceneDataset, fold_classes
from difffeat.extract import FeatureExtractor
from difffeat.noise import content_keys
from difffeat.readout import PerPixel
from difffeat.store import atomic_write
from experiments.probe_digits import ROOT, ensure_backbone, write_readme_table
from heads.fewshot import FeatureCache, FewShotIoU, Predictor, dense_features, episode_masks
from heads.fewshot_correlation import CorrelationFewShotModule
from heads.fewshot_diffews import DiffewSModule, mask_loss
from heads.fewshot_prototype import PrototypeSegmenter
from heads.fewshot_transfer import LabelTransferSegmenter

RESULTS = ROOT / "experiments" / "results"
CACHE = ROOT / ".cache" / "difffeat" / "fewshot"
CONFIG = ROOT / "configs" / "ddpm_scenes_attn2.yaml"
#: evaluation settings: (name, shots, vote)
SETTINGS = (("1-shot", 1, False), ("5-shot", 5, False), ("5-shot vote", 5, True))
#: the scenes of every split: several objects of distinct classes, a texture per object
SCENES = {"min_objects": 2, "distinct": True, "textured": True}
#: bumped when a runner's output changes, so that cached (arm, fold) results are recomputed
VERSIONS = {"oracle_arm": 1, "prototype_arm": 3, "transfer_arm": 1, "diffews_arm": 5, "query_only_arm": 1,
            "correlation_arm": 2, "separability": 2}
CANDIDATE_T = (10, 50, 200)
#: the correlation head's features: every block output at this timestep, correlated on this grid
CORRELATION_T, CORRELATION_GRID = 50, 16
SIZE = 32
EXAMPLES = 4  # fold-0 1-shot episodes drawn in the figure
BOOTSTRAP = 2000


# ---------------------------------------------------------------------------------------------- episodes

@functools.cache
def datamodule(fold: int, train_scenes: int, test_scenes: int, batch_size: int, negative_fraction: float,
               train_episodes: int) -> FewShotDataModule:
    """The fold's datamodule (scenes cached in memory, shared by every episode set of the fold)."""
    return FewShotDataModule(fold=fold, shots=1, size=SIZE, train_scenes=train_scenes, test_scenes=test_scenes,
                             train_episodes=train_episodes, batch_size=batch_size, counterfactual=True,
                             negative_fraction=negative_fraction, cache_scenes=True, **SCENES)


def fold_data(fold: int, args: argparse.Namespace) -> FewShotDataModule:
    return datamodule(fold, args.train_scenes, args.test_scenes, args.batch_size, args.negative_fraction,
                      args.train_steps * args.batch_size)


class OtherClassSupport(Dataset):
    """The episodes with each query's supports replaced by supports of *another* novel class.

    The other class is drawn per episode among the episodes' classes (seeded by the episode); its shots are
    images holding it, the query excluded. The query and its target are unchanged, so a model that segments
    what the support shows scores far lower, and one that ignores the support scores the same.
    """

    def __init__(self, episodes: FewShotEpisodes, seed: int = 7) -> None:
        self.episodes, self.seed = episodes, seed

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, e: int) -> dict[str, Any]:
        item = self.episodes[e]
        rng = np.random.default_rng([self.seed, e])
        others = [c for c in self.episodes.classes if c != item["class_id"]]
        c = others[int(rng.integers(len(others)))]
        pool = [i for i in self.episodes.index[c] if i != item["query_index"]]
        shots = [pool[j] for j in rng.choice(len(pool), self.episodes.shots, replace=False)]
        scenes = [self.episodes.dataset[i] for i in shots]
        return {**item, "support": torch.stack([s["image"] for s in scenes]),
                "support_mask": torch.stack([s["semantic"] == c + 1 for s in scenes])}


# ---------------------------------------------------------------------------------------------- scoring

def partner(x: torch.Tensor) -> torch.Tensor:
    """Each counterfactual-pair episode's value swapped with its partner's (pairs are consecutive rows)."""
    return x.view(-1, 2, *x.shape[1:]).flip(1).flatten(0, 1)


def _episode_iou(pred: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode foreground intersection and union over valid pixels (the parts :class:`FewShotIoU` sums)."""
    valid = ~ignore.bool()
    inter = (pred & target & valid).flatten(1).sum(1)
    union = ((pred | target) & valid).flatten(1).sum(1)
    return inter.numpy().astype(np.float64), union.numpy().astype(np.float64)


def evaluate(predict: Predictor, episodes: Dataset, vote: bool, desc: str, keep: int = 0) -> dict[str, Any]:
    """mIoU and FB-IoU (%) of ``predict`` over ``episodes`` (the protocol's :class:`FewShotIoU`), the
    per-episode foreground intersections / unions / classes (for the bootstrap), and the first ``keep``
    predicted masks."""
    metric, kept, inter, union, classes = FewShotIoU(len(CLASSES)), [], [], [], []
    with torch.no_grad():
        for batch in tqdm(DataLoader(episodes, batch_size=8), desc=desc, leave=False):
            masks = episode_masks(predict, batch["support"], batch["support_mask"], batch["query"], vote)
            metric.update(masks, batch["query_mask"], batch["class_id"], batch["query_ignore"])
            i, u = _episode_iou(masks, batch["query_mask"], batch["query_ignore"])
            inter.append(i)
            union.append(u)
            classes.append(batch["class_id"].numpy())
            kept += [m.numpy() for m in masks[: keep - len(kept)]]
    scores = metric.compute()
    out = {"miou": 100 * float(scores["miou"]), "fbiou": 100 * float(scores["fbiou"]),
           "inter": np.concatenate(inter).tolist(), "union": np.concatenate(union).tolist(),
           "class": np.concatenate(classes).tolist()}
    if keep:
        out["examples"] = [k.tolist() for k in kept]
    return out


def selectivity(predict: Predictor, pairs: FewShotEpisodes, desc: str) -> dict[str, Any]:
    """Counterfactual selectivity on pairs of episodes sharing a query that holds classes A and B.

    For each episode: IoU of the prediction (given the episode's own class's support) with its own class's
    target, minus its IoU with the pair's other class's target. Returns the per-episode differences and
    their mean (IoU points).
    """
    diffs = []
    with torch.no_grad():
        for batch in tqdm(DataLoader(pairs, batch_size=8), desc=desc, leave=False):  # even: pairs stay together
            pred = predict(batch["support"], batch["support_mask"], batch["query"])
            target, ignore = batch["query_mask"], batch["query_ignore"]
            swapped = partner(target)
            i_own, u_own = _episode_iou(pred, target, ignore)
            i_other, u_other = _episode_iou(pred, swapped, ignore)
            diffs.append(100 * (i_own / np.maximum(u_own, 1) - i_other / np.maximum(u_other, 1)))
    d = np.concatenate(diffs)
    return {"mean": float(d.mean()), "per_episode": d.tolist()}


def _miou(inter: np.ndarray, union: np.ndarray, cls: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The protocol's mIoU (%) of episode resamples ``idx`` ``(R, n)``: per class ΣI / ΣU, mean over classes."""
    n_cls = int(cls.max()) + 1
    rows = np.arange(len(idx))[:, None]
    flat = (rows * n_cls + cls[idx]).ravel()
    si = np.bincount(flat, inter[idx].ravel(), len(idx) * n_cls).reshape(len(idx), n_cls)
    su = np.bincount(flat, union[idx].ravel(), len(idx) * n_cls).reshape(len(idx), n_cls)
    seen = np.bincount(flat, None, len(idx) * n_cls).reshape(len(idx), n_cls) > 0
    return 100 * np.where(seen, si / np.maximum(su, 1), 0).sum(1) / seen.sum(1)


def paired_gap(own: list[dict[str, Any]], other: list[dict[str, Any]], seed: int = 0) -> tuple[float, float, float]:
    """Mean over folds of mIoU(own) − mIoU(other), and its paired bootstrap 95 % interval.

    Each replicate resamples every fold's episodes with replacement and scores *both* conditions on that
    same resample (the episodes are the same queries in both), then averages the folds' gaps.
    """
    rng = np.random.default_rng(seed)
    gaps, point = np.zeros(BOOTSTRAP), []
    for a, b in zip(own, other, strict=True):
        arrays = [np.asarray(a[k]) for k in ("inter", "union")] + [np.asarray(b[k]) for k in ("inter", "union")]
        cls = np.asarray(a["class"])
        if not np.array_equal(cls, np.asarray(b["class"])):
            raise ValueError("a paired bootstrap needs the same episodes in both conditions")
        n = len(cls)
        idx = rng.integers(0, n, (BOOTSTRAP, n))
        gaps += _miou(arrays[0], arrays[1], cls, idx) - _miou(arrays[2], arrays[3], cls, idx)
        full = np.arange(n)[None]
        point.append(float(_miou(arrays[0], arrays[1], cls, full)[0] - _miou(arrays[2], arrays[3], cls, full)[0]))
    gaps /= len(own)
    return float(np.mean(point)), float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))


def mean_ci(per_fold: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """Mean over folds of per-episode values' means, and its bootstrap 95 % interval."""
    rng = np.random.default_rng(seed)
    reps = np.zeros(BOOTSTRAP)
    for values in per_fold:
        v = np.asarray(values)
        reps += v[rng.integers(0, len(v), (BOOTSTRAP, len(v)))].mean(1)
    reps /= len(per_fold)
    return float(np.mean([np.mean(v) for v in per_fold])), float(np.percentile(reps, 2.5)), \
        float(np.percentile(reps, 97.5))


# ---------------------------------------------------------------------------------------------- arms

def evaluate_all(predict: Predictor, fold: int, args: argparse.Namespace, label: str,
                 empty: Predictor | None = None, support_free: bool = False) -> dict[str, Any]:
    """Every setting of :data:`SETTINGS` and the controls, on the fold's test episodes.

    ``support_free``: the predictor never reads the support (the query-only control, tested so in
    ``tests/heads/test_fewshot_diffews.py``): only the 1-shot setting is run, since every other setting
    and control would give the same masks on the same queries.
    """
    data, out = fold_data(fold, args), {}
    if support_free:
        out["1-shot"] = evaluate(predict, data.episodes(False, 1, args.episodes), False, f"{label} f{fold} 1-shot",
                                 EXAMPLES if fold == 0 else 0)
        return out
    for name, shots, vote in SETTINGS:
        keep = EXAMPLES if (fold, name) == (0, "1-shot") else 0
        out[name] = evaluate(predict, data.episodes(False, shots, args.episodes), vote, f"{label} f{fold} {name}",
                             keep)
    one_shot = data.episodes(False, 1, args.episodes)
    out["other class"] = evaluate(predict, OtherClassSupport(one_shot), False, f"{label} f{fold} other class")
    if empty is not None:
        out["empty support"] = evaluate(empty, one_shot, False, f"{label} f{fold} empty support")
    pairs = data.episodes(False, 1, args.episodes, counterfactual=True)
    out["selectivity"] = selectivity(predict, pairs, f"{label} f{fold} selectivity")
    return out


def oracle_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """The every-object oracle: each query's predicted mask is the union of all its ground-truth objects
    (whatever the support; a query image is recognised by its content)."""
    scenes = fold_data(fold, args).scenes(False)
    items = [scenes[i] for i in range(len(scenes))]
    objects = dict(zip(content_keys(torch.stack([s["image"] for s in items])), [s["semantic"] > 0 for s in items],
                       strict=True))

    def predict(support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return torch.stack([objects[k] for k in content_keys(query)])

    data, out = fold_data(fold, args), {}
    for name, shots, vote in SETTINGS:
        out[name] = evaluate(predict, data.episodes(False, shots, args.episodes), vote, f"oracle f{fold} {name}",
                             EXAMPLES if (fold, name) == (0, "1-shot") else 0)
    return out


def block_outputs(backbone: Any) -> list[str]:
    """The candidate taps: every block's output (``down_blocks.i``, ``mid_block``, ``up_blocks.i``)."""
    return [n for n in backbone.feature_info if n == "mid_block" or (n.count(".") == 1 and "blocks." in n)]


def warm(cache: FeatureCache, scenes: Dataset, rows: int = 32) -> None:
    """Computes the features of every scene in batches of ``rows`` images (an episode brings 2–6 images, and
    a forward costs as much for 2 images as for 32 on the CPU, where every forward is padded to 32 rows)."""
    for start in tqdm(range(0, len(scenes), rows), desc="features", leave=False):
        cache(torch.stack([scenes[i]["image"] for i in range(start, min(start + rows, len(scenes)))]))


def _segmenter(method: str, features: Callable[[torch.Tensor], torch.Tensor], args: argparse.Namespace) -> Any:
    if method == "prototype":
        return PrototypeSegmenter(features)
    return LabelTransferSegmenter(features, k=args.k)


#: the candidate taps' features of the base-class validation scenes, per (backbone, fold): the prototype and
#: label-transfer arms of a fold choose their taps on the same features, computed once
_CANDIDATES: dict[tuple[str, int], tuple[Any, FewShotEpisodes, FeatureCache, dict[tuple[str, int], slice]]] = {}


def candidates(backbone: str, fold: int, args: argparse.Namespace) -> tuple[Any, FewShotEpisodes, FeatureCache,
                                                                              dict[tuple[str, int], slice]]:
    """The backbone, the base-class validation episodes, their features at every candidate tap, and each
    candidate's channels in those features."""
    if (backbone, fold) not in _CANDIDATES:
        _CANDIDATES.clear()  # one fold's features at a time
        model = create_backbone(backbone)
        base = [c for c in range(len(CLASSES)) if c not in fold_classes(fold)]
        scenes = SceneDataset(args.val_scenes, SIZE, 0, classes=base, cache=True, **SCENES)
        val = FewShotEpisodes(scenes, base, 1, args.val_episodes, seed=0, evaluation=True)
        layers = block_outputs(model)
        extractor = FeatureExtractor(model, layers, CANDIDATE_T, readout=PerPixel(SIZE), noise="content")
        cache = FeatureCache(dense_features(extractor))
        offsets, start = {}, 0
        for layer in layers:  # concat_features order: layer-major, then timestep
            for t in CANDIDATE_T:
                width = model.feature_info[layer].channels
                offsets[(layer, t)] = slice(start, start + width)
                start += width
        warm(cache, scenes)
        _CANDIDATES[(backbone, fold)] = model, val, cache, offsets
    return _CANDIDATES[(backbone, fold)]


def _training_free(method: str, backbone: str, fold: int, args: argparse.Namespace) -> dict[str, Any]:
    """Chooses a tap on base-class episodes, then evaluates a training-free method on the novel ones."""
    model, val, cache, offsets = candidates(backbone, fold, args)
    val_miou = {}
    for key, cols in offsets.items():
        segmenter = _segmenter(method, lambda x, cols=cols: cache(x)[:, cols], args)
        val_miou[key] = evaluate(segmenter.predict, val, False, f"{method} select {key}")["miou"]
    layer, t = max(val_miou, key=val_miou.get)
    extractor = FeatureExtractor(model, [layer], [t], readout=PerPixel(SIZE), noise="content")
    test_cache = FeatureCache(dense_features(extractor))
    warm(test_cache, fold_data(fold, args).scenes(False))
    segmenter = _segmenter(method, test_cache, args)
    return {"tap": f"{layer}@t{t}", "val_miou": val_miou[(layer, t)],
            **evaluate_all(segmenter.predict, fold, args, method)}


def prototype_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    return _training_free("prototype", backbone, fold, args)


def transfer_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    return _training_free("transfer", backbone, fold, args)


class LossHistory(L.Callback):
    """Every training step's logged losses."""

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.pair_loss: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        metrics = trainer.callback_metrics
        self.loss.append(float(metrics["train/loss"]))
        self.pair_loss.append(float(metrics.get("train/pair_loss", float("nan"))))


def heldout_pair_loss(model: Any, fold: int, args: argparse.Namespace) -> float:
    """Mean :func:`mask_loss` on counterfactual pairs of base-class scenes no training episode drew from."""
    base = [c for c in range(len(CLASSES)) if c not in fold_classes(fold)]
    scenes = SceneDataset(args.val_scenes, SIZE, 2000, classes=base, cache=True, **SCENES)
    pairs = FewShotEpisodes(scenes, base, 1, args.val_episodes, seed=2000, counterfactual=True)
    losses = []
    with torch.no_grad():
        for batch in DataLoader(pairs, batch_size=8):
            logits = model(batch["support"], batch["support_mask"], batch["query"])
            losses.append(float(mask_loss(logits, batch["query_mask"], batch["query_ignore"])))
    return float(np.mean(losses))


def attention_entropy(model: Any, episodes: Dataset, n: int = 16) -> dict[str, list[float]]:
    """How selective DiffewS's fused self-attentions are on ``n`` episodes, per token grid (coarsest last).

    For every fused attention of the query pass: the mean entropy of its per-head attention probabilities
    over query tokens as a fraction of the uniform distribution's (1: every query token spreads its
    attention evenly over its own and the support's tokens, which makes the fused read a plain average of
    the support), and the share of attention the support's tokens receive. Keys are captured from the
    query's own projection and from the K/V bank just before the query pass reads it.
    """
    fusion, own, queries, bank = model.fusion, {}, {}, {}
    hooks = [h for name, attn in fusion.attns.items() for h in (
        attn.to_q.register_forward_hook(lambda _m, _i, out, n=name: queries.__setitem__(n, out)),
        attn.to_k.register_forward_hook(lambda _m, _i, out, n=name: own.__setitem__(n, out)))]
    read = fusion.read

    @contextlib.contextmanager
    def keep_bank() -> Any:
        bank.update(fusion.bank)
        with read():
            yield

    fusion.read = keep_bank
    per_grid: dict[int, list[tuple[float, float]]] = {}
    try:
        with torch.no_grad():
            batch = next(iter(DataLoader(Subset(episodes, range(n)), batch_size=n)))
            model(batch["support"], batch["support_mask"], batch["query"])
        for name, attn in fusion.attns.items():
            q, k = queries[name], torch.cat([own[name], bank[f"{name}.to_k"]], 1)
            tokens = q.shape[1]
            qh, kh = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (q, k))  # (E, heads, N, d)
            p = (qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5).softmax(-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / np.log(k.shape[1])
            per_grid.setdefault(tokens, []).append((float(entropy), float(p[..., tokens:].sum(-1).mean())))
    finally:
        del fusion.read
        for h in hooks:
            h.remove()
    return {f"{int(np.sqrt(t))}x{int(np.sqrt(t))}": np.mean(v, 0).tolist() for t, v in sorted(per_grid.items(),
                                                                                             reverse=True)}


def fit(module: L.LightningModule, fold: int, args: argparse.Namespace) -> tuple[Any, LossHistory]:
    """Trains a few-shot module on the fold's base-class episodes for ``args.train_steps`` steps; returns its
    model in eval mode and the per-step losses."""
    history = LossHistory()
    trainer = L.Trainer(accelerator="cpu", max_steps=args.train_steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False,
                        callbacks=[history])
    trainer.fit(module, datamodule=fold_data(fold, args))
    return module.model.eval(), history


def trained_results(model: Any, history: LossHistory, fold: int, args: argparse.Namespace, name: str,
                    support_free: bool = False) -> dict[str, Any]:
    """A trained arm's losses, held-out pair loss and :func:`evaluate_all` (with the empty-support control)."""

    def empty(support: torch.Tensor, masks: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return model.predict(support, torch.zeros_like(masks), query, allow_empty_support=True)

    return {"train_steps": args.train_steps, "loss": history.loss, "pair_loss": history.pair_loss,
            "heldout_pair_loss": heldout_pair_loss(model, fold, args),
            **evaluate_all(model.predict, fold, args, name, empty, support_free=support_free)}


def _train(backbone: str, fold: int, args: argparse.Namespace, tag: str, query_only: bool) -> dict[str, Any]:
    """Fine-tunes DiffewS (or its query-only control) on the fold's base-class pair episodes, then
    evaluates it; its weights are kept in ``{CACHE}/{tag}.safetensors``."""
    L.seed_everything(0, verbose=False)
    module = DiffewSModule(backbone=backbone, lr=args.lr, query_only=query_only)
    probe = fold_data(fold, args).episodes(False, 1, args.episodes)
    attention = {} if query_only else {"pretrained": attention_entropy(module.model.eval(), probe)}
    module.model.train()
    model, history = fit(module, fold, args)
    if not query_only:
        attention["fine-tuned"] = attention_entropy(model, probe)
    CACHE.mkdir(parents=True, exist_ok=True)
    atomic_write(CACHE / f"{tag}.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    name = "query-only" if query_only else "diffews"
    return {**trained_results(model, history, fold, args, name, support_free=query_only), "attention": attention}


def correlation_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Trains the HSNet-style correlation head (every block output at :data:`CORRELATION_T`, frozen) on the
    fold's base-class episodes, with DiffewS's steps, episodes and seed, then evaluates it."""
    L.seed_everything(0, verbose=False)
    layers = block_outputs(create_backbone(backbone))
    module = CorrelationFewShotModule(backbone=backbone, layers=layers, timesteps=[CORRELATION_T],
                                      feature_size=CORRELATION_GRID, lr=args.correlation_lr)
    module.model.features = FeatureCache(module.model.features)  # scenes recur across episodes
    model, history = fit(module, fold, args)
    return trained_results(model, history, fold, args, "correlation")


def diffews_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    return _train(backbone, fold, args, tag, query_only=False)


def query_only_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    return _train(backbone, fold, args, tag, query_only=True)


def separability(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """How well the fold's novel classes can be told apart, object by object, on its test scenes.

    Each visible object of a novel class (at least 4 pixels; the test scenes hold every class) becomes
    (a) its masked-average features at every candidate tap (every block output at :data:`CANDIDATE_T`), and
    at all taps together; (b) its silhouette: the mask's bounding box resized to 12×12; (c) its mean
    colour. A 5-way logistic regression (standardised inputs, 5-fold stratified cross-validation) scores
    each. The feature rows are an upper bound on what the features offer a few-shot method (many labelled
    objects, the best tap chosen after the fact); the silhouette row says how far shape alone separates the
    classes at this size, the colour row how little colour does.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scenes, novel = fold_data(fold, args).scenes(False), set(fold_classes(fold))
    model = create_backbone(backbone)
    layers = block_outputs(model)
    features = dense_features(FeatureExtractor(model, layers, CANDIDATE_T, readout=PerPixel(SIZE), noise="content"))
    vectors, silhouettes, colours, labels = [], [], [], []
    for start in tqdm(range(0, len(scenes), 32), desc=f"separability f{fold}", leave=False):
        items = [scenes[i] for i in range(start, min(start + 32, len(scenes)))]
        with torch.no_grad():
            maps = features(torch.stack([item["image"] for item in items]))
        for item, fmap in zip(items, maps, strict=True):
            for mask, label in zip(item["masks"], item["labels"], strict=True):
                if int(label) not in novel or mask.sum() < 4:
                    continue
                m = mask.float()
                vectors.append((fmap * m).sum((1, 2)) / m.sum())
                colours.append((item["image"] * m).sum((1, 2)) / m.sum())
                ys, xs = mask.nonzero(as_tuple=True)
                crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                silhouettes.append(F.interpolate(crop[None, None], size=(12, 12), mode="area").flatten())
                labels.append(int(label))
    y = np.asarray(labels)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)

    def accuracy(x: torch.Tensor) -> float:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return 100 * float(cross_val_score(probe, x.numpy(), y, cv=folds).mean())

    x = torch.stack(vectors)
    per_tap, start = {}, 0
    for layer in layers:  # concat_features order: layer-major, then timestep
        for t in CANDIDATE_T:
            width = model.feature_info[layer].channels
            per_tap[f"{layer}@t{t}"] = accuracy(x[:, start:start + width])
            start += width
    best = max(per_tap, key=per_tap.get)
    return {"objects": len(y), "best tap": best, "best": per_tap[best], "all taps": accuracy(x),
            "silhouette": accuracy(torch.stack(silhouettes)), "colour": accuracy(torch.stack(colours)),
            "per tap": per_tap}


def separability_table(per_fold: dict[int, dict[str, Any]], folds: list[int]) -> str:
    """Markdown: 5-way object classification accuracy per fold and input (chance 20 %)."""
    rows = [("frozen features, best single tap (chosen after the fact)", "best"),
            ("frozen features, every tap", "all taps"), ("silhouette (12×12 mask crop)", "silhouette"),
            ("mean colour", "colour")]
    lines = ["| input | " + " | ".join(f"fold {f}" for f in folds) + " | mean |", "|---|" + "---|" * (len(folds) + 1)]
    for name, key in rows:
        values = [per_fold[f][key] for f in folds]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | **{np.mean(values):.1f}** |")
    lines.append("| objects (best tap) | " + " | ".join(f"{per_fold[f]['objects']} (`{per_fold[f]['best tap']}`)"
                                                     for f in folds) + " | |")
    return "\n".join(lines)


ORACLE = "every-object oracle (ground-truth instances)"
DIFFEWS = "DiffewS · counterfactual + negative episodes"
QUERY_ONLY = "DiffewS query-only · same training, no support"
PROTOTYPE = "prototype · DDPM-trained U-Net"
TRANSFER = "label transfer (k-NN) · DDPM-trained U-Net"
CORRELATION = "HSNet-style correlation head · DDPM-trained U-Net, frozen"


def arms(args: argparse.Namespace) -> dict[str, tuple[Callable[..., dict[str, Any]], str]]:
    """Arm label → (runner, backbone), in the order they run (cheap ones first)."""
    backbone = args.backbone or str(ensure_backbone(CONFIG))
    table = {ORACLE: (oracle_arm, backbone), PROTOTYPE: (prototype_arm, backbone),
             TRANSFER: (transfer_arm, backbone), CORRELATION: (correlation_arm, backbone),
             DIFFEWS: (diffews_arm, backbone),
             QUERY_ONLY: (query_only_arm, backbone)}
    return {k: v for k, v in table.items() if not args.arms or any(a in k for a in args.arms)}


def _stamp(backbone: str) -> str:
    stamp = Path(backbone) / "difffeat-config.sha256"
    return stamp.read_text() if stamp.exists() else backbone


def run_cached(label: str, runner: Callable[..., dict[str, Any]], backbone: str, fold: int,
               args: argparse.Namespace) -> dict[str, Any]:
    """One (arm, fold), reused from the cache when run before with the same settings and backbone."""
    settings = {k: v for k, v in vars(args).items() if k not in ("arms", "folds", "out")}
    key = hashlib.sha256(json.dumps([label, _stamp(backbone), fold, settings, VERSIONS[runner.__name__], SCENES,
                                     SIZE], sort_keys=True).encode()).hexdigest()
    path = CACHE / f"{key[:16]}.json"
    if not path.exists():
        start = time.perf_counter()
        result = runner(backbone, fold, args, key[:16])
        result["seconds"] = time.perf_counter() - start
        CACHE.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result).encode())
    return {**json.loads(path.read_text()), "tag": key[:16]}


# ---------------------------------------------------------------------------------------------- report

Results = dict[str, dict[int, dict[str, Any]]]


def table(results: Results, folds: list[int]) -> str:
    """Markdown: mIoU per fold and mean, FB-IoU mean, per arm and setting."""
    head = "| method | setting | " + " | ".join(f"fold {f}" for f in folds) + " | mean mIoU | mean FB-IoU |"
    lines = [head, "|" + "---|" * (len(folds) + 4)]
    for label, per_fold in results.items():
        for name, _, _ in SETTINGS:
            if name not in per_fold[folds[0]]:
                blank = " | ".join("" for _ in folds)
                lines.append(f"| {label} | {name} | {blank} | same masks as 1-shot (support unused) | |")
                continue
            miou = [per_fold[f][name]["miou"] for f in folds]
            fb = [per_fold[f][name]["fbiou"] for f in folds]
            cells = " | ".join(f"{m:.1f}" for m in miou)
            lines.append(f"| {label} | {name} | {cells} | **{np.mean(miou):.1f}** | {np.mean(fb):.1f} |")
    return "\n".join(lines)


def _mean(per_fold: dict[int, dict[str, Any]], folds: list[int], name: str) -> float:
    return float(np.mean([per_fold[f][name]["miou"] for f in folds]))


def control_table(results: Results, folds: list[int]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Markdown: the 1-shot controls per arm (means over folds, bootstrap intervals), and the figures."""
    lines = ["| method | mIoU, own support | mIoU, another class's support | own − other [95 % CI] | "
             "mIoU, empty support mask | selectivity, IoU points [95 % CI] |", "|---|---|---|---|---|---|"]
    figures = {}
    for label, per_fold in results.items():
        if label == QUERY_ONLY:
            lines.append(f"| {label} | {_mean(per_fold, folds, '1-shot'):.1f} | same masks (support unused) | 0 by "
                         f"construction | same masks | 0 by construction |")
            continue
        if "other class" not in per_fold[folds[0]]:
            continue
        gap = paired_gap([per_fold[f]["1-shot"] for f in folds], [per_fold[f]["other class"] for f in folds])
        sel = mean_ci([per_fold[f]["selectivity"]["per_episode"] for f in folds])
        empty = f"{_mean(per_fold, folds, 'empty support'):.1f}" if "empty support" in per_fold[folds[0]] else "–"
        figures[label] = {"gap": gap, "selectivity": sel}
        lines.append(f"| {label} | {_mean(per_fold, folds, '1-shot'):.1f} | {_mean(per_fold, folds, 'other class'):.1f}"
                     f" | {gap[0]:+.1f} [{gap[1]:+.1f}, {gap[2]:+.1f}] | {empty} | "
                     f"{sel[0]:+.1f} [{sel[1]:+.1f}, {sel[2]:+.1f}] |")
    return "\n".join(lines), figures


def training_table(results: Results, folds: list[int]) -> str:
    """Markdown: training loss on counterfactual pairs (last 50 steps) and held-out pair loss per fold."""
    lines = ["| method | " + " | ".join(f"fold {f}: train pair loss / held-out pair loss" for f in folds) + " |",
             "|---|" + "---|" * len(folds)]
    for label, per_fold in results.items():
        if "pair_loss" not in per_fold[folds[0]]:
            continue
        cells = [f"{np.nanmean(per_fold[f]['pair_loss'][-50:]):.3f} / {per_fold[f]['heldout_pair_loss']:.3f}"
                 for f in folds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attention_table(results: Results, folds: list[int]) -> str:
    """Markdown: DiffewS's fused self-attention entropy (fraction of uniform) and support share per grid,
    before and after fine-tuning (means over folds)."""
    if DIFFEWS not in results or "attention" not in results[DIFFEWS][folds[0]]:
        return ""
    runs = [results[DIFFEWS][f]["attention"] for f in folds]
    grids = list(runs[0]["pretrained"])
    lines = ["| DiffewS self-attention | " + " | ".join(f"{g} tokens" for g in grids) + " |",
             "|---|" + "---|" * len(grids)]
    for stage in ("pretrained", "fine-tuned"):
        for i, what in enumerate(("entropy / uniform", "share on support tokens")):
            cells = " | ".join(f"{np.mean([r[stage][g][i] for r in runs]):.3f}" for g in grids)
            lines.append(f"| {stage}: {what} | {cells} |")
    return "\n".join(lines)


def verdicts(results: Results, folds: list[int], figures: dict[str, dict[str, Any]]) -> str:
    """The acceptance targets, each checked against the measured figures (reached or not)."""
    if DIFFEWS not in results:
        return ""
    d = results[DIFFEWS]
    one = _mean(d, folds, "1-shot")
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'reached' if ok else '**not reached**'}: {text}")

    gap = figures[DIFFEWS]["gap"]
    check(gap[0] >= 10 and gap[1] > 0, f"own-vs-other-support gap ≥ 10 mIoU points with its interval above 0 "
          f"(measured {gap[0]:+.1f} [{gap[1]:+.1f}, {gap[2]:+.1f}])")
    five = _mean(d, folds, "5-shot")
    check(five >= one, f"5-shot ≥ 1-shot ({five:.1f} vs {one:.1f}; vote {_mean(d, folds, '5-shot vote'):.1f})")
    for other in (QUERY_ONLY, ORACLE, TRANSFER):
        if other in results:
            theirs = _mean(results[other], folds, "1-shot")
            check(one > theirs, f"1-shot mIoU above {other} ({one:.1f} vs {theirs:.1f})")
    if QUERY_ONLY in results:
        ours = np.mean([d[f]["heldout_pair_loss"] for f in folds])
        theirs = np.mean([results[QUERY_ONLY][f]["heldout_pair_loss"] for f in folds])
        check(ours < theirs, f"held-out counterfactual-pair loss below the query-only model's ({ours:.3f} vs "
              f"{theirs:.3f})")
    return "\n".join(lines)


def figure(results: Results, path: Path, n: int, args: argparse.Namespace) -> None:
    """Fold-0 1-shot episodes: support with its mask, query, ground truth, and each arm's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = fold_data(0, args).episodes(False, 1, args.episodes)
    labels = [k for k, v in results.items() if 0 in v and "examples" in v[0]["1-shot"]]
    cols = 4 + len(labels)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 2.0 * n), squeeze=False)
    for e in range(n):
        item = episodes[e]
        panels = [((item["support"][0].permute(1, 2, 0) + 1) / 2, "support"),
                  (item["support_mask"][0], "support mask"), ((item["query"].permute(1, 2, 0) + 1) / 2, "query"),
                  (item["query_mask"], "query ground truth")]
        panels += [(torch.tensor(results[k][0]["1-shot"]["examples"][e]), k.split(" · ")[0]) for k in labels]
        for ax, (img, title) in zip(axes[e], panels, strict=True):
            ax.imshow(img.float().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if e == 0:
                ax.set_title(title, fontsize=7)
        axes[e][0].set_ylabel(CLASSES[item["class_id"]], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_figure(results: Results, path: Path, folds: list[int]) -> None:
    """Training loss on counterfactual pairs per fold (moving mean of 25 steps) of every trained arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(folds), figsize=(3.2 * len(folds), 2.6), squeeze=False, sharey=True)
    for ax, f in zip(axes[0], folds, strict=True):
        for label in (DIFFEWS, QUERY_ONLY, CORRELATION):
            if label in results:
                v = np.asarray(results[label][f]["pair_loss"])
                v = np.where(np.isnan(v), np.nanmean(v), v)
                ax.plot(np.convolve(v, np.ones(25) / 25, mode="valid"), label=label.split(" · ")[0])
        ax.set_title(f"fold {f}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
    axes[0][0].set_ylabel("pair loss (BCE + Dice)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: Results, folds: list[int]) -> str:
    """Markdown: mean mIoU over folds per arm (rows) and setting (columns)."""
    lines = ["| method | " + " | ".join(n for n, _, _ in SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for label, per_fold in results.items():
        cells = " | ".join(f"{_mean(per_fold, folds, n):.1f}" if n in per_fold[folds[0]] else "= 1-shot"
                           for n, _, _ in SETTINGS)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--episodes", type=int, default=300, help="test episodes per fold and condition")
    parser.add_argument("--val-episodes", type=int, default=100, help="base-class episodes choosing the tap")
    parser.add_argument("--val-scenes", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=1000, help="steps per fold of each trained arm")
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--test-scenes", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8, help="DiffewS episodes per step (whole pairs)")
    parser.add_argument("--negative-fraction", type=float, default=0.15)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--correlation-lr", type=float, default=1e-3, help="correlation head's learning rate")
    parser.add_argument("--k", type=int, default=10, help="label-transfer neighbours")
    parser.add_argument("--arms", nargs="*", default=None, help="run only arms whose label holds one of these")
    parser.add_argument("--backbone", help="trained scenes U-Net folder (default: train or reuse "
                        "configs/ddpm_scenes_attn2.yaml's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fewshot_benchmark.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: Results = {}
    table_arms = arms(args)
    for fold in args.folds:  # fold-major: a run cut short leaves whole folds in the cache
        for label, (runner, backbone) in table_arms.items():
            print(f"== {label}, fold {fold}", flush=True)
            r = results.setdefault(label, {})[fold] = run_cached(label, runner, backbone, fold, args)
            print(json.dumps({k: round(v["miou"], 1) for k, v in r.items() if isinstance(v, dict) and "miou" in v}),
                  flush=True)
    folds = args.folds
    backbone = args.backbone or str(ensure_backbone(CONFIG))
    separable = {f: run_cached("feature separability", separability, backbone, f, args) for f in folds}
    controls, figures = control_table(results, folds)
    taps = "\n".join(f"- {label}: " + ", ".join(f"fold {f} `{r['tap']}` (base-class val mIoU {r['val_miou']:.1f})"
                                                 for f, r in per_fold.items())
                     for label, per_fold in results.items() if "tap" in next(iter(per_fold.values())))
    minutes = {label: sum(r["seconds"] for r in per_fold.values()) / 60 for label, per_fold in results.items()}
    cli = " ".join(argv) if argv else ""
    command = " ".join(["python -m experiments.fewshot_benchmark", *([cli] if cli else [])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    examples = args.out.with_name(f"{args.out.stem}_examples.png")
    losses = args.out.with_name(f"{args.out.stem}_losses.png")
    figure(results, examples, EXAMPLES, args)
    if {DIFFEWS, QUERY_ONLY, CORRELATION} & results.keys():
        loss_figure(results, losses, folds)
    text = f"""# Few-shot segmentation on the scene benchmark

Written by `{command}`. {args.episodes} test episodes per fold and
condition ({SIZE}×{SIZE} scenes of 2–4 objects of distinct classes, a random texture per object, seed 1000;
fold f's five novel classes); mIoU = mean over classes of ΣI/ΣU summed over that class's episodes,
FB-IoU over all episodes (%). One diffusion model behind every learned arm: `sd-unet-scenes-attn2`
(attention at 16×16, 8×8, 4×4 of a 32-px scene) after `configs/ddpm_scenes_attn2.yaml`. DiffewS:
{args.train_steps} steps of {args.batch_size} one-shot base-class episodes per fold (counterfactual pairs,
{args.negative_fraction:.0%} negatives), lr {args.lr}; the query-only control and the correlation head
(lr {args.correlation_lr}) get the same steps, episodes and seed. Training-free taps chosen on
{args.val_episodes} one-shot base-class episodes.

{table(results, folds)}

## Does the method segment what the support shows?

1-shot, means over the folds. *Another class's support*: each query gets supports of another novel class
and is still scored against its own. *Empty support mask*: the support images with all-background masks.
*Selectivity*: on queries that hold two novel classes A and B, IoU with A's ground truth minus IoU with B's,
both for the prediction given an A-support (0 when the support is ignored). Intervals: paired bootstrap
over episodes, {BOOTSTRAP} replicates.

{controls}

Training on counterfactual pairs (the loss a support-blind model cannot bring down: one query, two
targets): mean training loss of the pairs' episodes over the last 50 steps, and the loss on
{args.val_episodes} held-out base-class pair episodes (other scenes) after training:

{training_table(results, folds)}

![training loss on counterfactual pairs]({losses.name})

How selective KV fusion's attention is (16 one-shot test episodes per fold; 1-shot, so a query token that
spread its attention evenly would give the support's tokens a share of 0.5):

{attention_table(results, folds)}

Can the features tell the novel classes apart at all? A 5-way logistic regression on each test object
(5-fold cross-validation, chance 20 %), on the pretrained U-Net's masked-average features, on the object's
silhouette, and on its mean colour:

{separability_table(separable, folds)}

Targets:
{verdicts(results, folds, figures)}

Taps chosen per fold:
{taps}

CPU minutes per arm (all folds, cached arms count their first run): """ + ", ".join(
        f"{k}: {v:.1f}" for k, v in minutes.items()) + f"""

![fold-0 one-shot episodes]({examples.name})
"""
    atomic_write(args.out, text.encode())
    if args.out == RESULTS / "fewshot_benchmark.md":
        scope = "" if folds == [0, 1, 2, 3] else f"\n\n(folds {', '.join(map(str, folds))} only so far)"
        write_readme_table(summary(results, folds) + scope, marker="fewshot")
    print(text)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
