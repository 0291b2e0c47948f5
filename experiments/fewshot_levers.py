"""Does a cheap lever make DiffewS read its support? Fold 0, one budget, the same episodes for every arm.

The benchmark (:mod:`experiments.fewshot_benchmark`) finds DiffewS support-blind. This study changes one
thing at a time against the benchmark's recipe and measures, after ``--steps`` steps of the same
counterfactual + negative episodes with the same seed:

* the loss on 100 held-out base-class counterfactual pairs (a support-blind model cannot bring it down);
* how far the logits move when each pair's query is given its partner's support instead of its own
  (mean absolute change as % of the logits' std; 0 when the support is ignored);
* novel-class 1-shot mIoU with the query's own support and with another class's support, on 300 episodes,
  and their paired-bootstrap gap;
* the fused self-attentions' entropy as a fraction of uniform, at the finest grid
  (:func:`experiments.fewshot_benchmark.attention_entropy`);
* how well the arm's pretrained U-Net features tell fold 0's novel classes apart, object by object
  (:func:`experiments.fewshot_benchmark.separability`, best tap; chance 20 %).

Arms: the benchmark's recipe (lr 2e-4, timestep 0, the 600-step pretrained U-Net); a 5× learning rate;
a U-Net pretrained 5× longer (3000 steps of ``configs/ddpm_scenes_attn2.yaml``, trained here if missing,
20 CPU-min); and the query-only control of the recipe.

Run: ``python -m experiments.fewshot_levers`` (writes ``experiments/results/fewshot_levers.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from difffeat.data.episodes import FewShotEpisodes
from difffeat.data.scenes import CLASSES, SceneDataset, fold_classes
from difffeat.store import atomic_write
from experiments.fewshot_benchmark import (
    CACHE,
    CONFIG,
    RESULTS,
    SCENES,
    SIZE,
    OtherClassSupport,
    attention_entropy,
    evaluate,
    fit,
    fold_data,
    heldout_pair_loss,
    paired_gap,
    partner,
    run_cached,
    separability,
)
from experiments.probe_digits import ROOT, ensure_backbone
from heads.fewshot_diffews import DiffewSModule

LONG_PRETRAINING = 3000


def logit_move(model: Any, args: argparse.Namespace) -> float:
    """Mean |Δ logits| (% of the logits' std) when held-out base-class pairs swap their supports."""
    base = [c for c in range(len(CLASSES)) if c not in fold_classes(0)]
    scenes = SceneDataset(args.val_scenes, SIZE, 2000, classes=base, cache=True, **SCENES)
    pairs = FewShotEpisodes(scenes, base, 1, args.val_episodes, seed=2000, counterfactual=True)
    moves = []
    with torch.no_grad():
        for b in DataLoader(pairs, batch_size=8):  # even: pairs stay together
            own = model(b["support"], b["support_mask"], b["query"])
            swapped = model(partner(b["support"]), partner(b["support_mask"]), b["query"])
            moves.append(float((own - swapped).abs().mean() / own.std()))
    return 100 * float(np.mean(moves))


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """The benchmark's settings for this study's budget (its episodes, scenes and batch)."""
    return argparse.Namespace(train_scenes=2000, test_scenes=600, batch_size=8, negative_fraction=0.15,
                              train_steps=args.steps, val_scenes=args.val_scenes, val_episodes=args.val_episodes)


def run_arm(name: str, backbone: str, lr: float, query_only: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Trains one arm on fold 0 and measures it (cached by its settings)."""
    stamp = (Path(backbone) / "difffeat-config.sha256").read_text()
    key = json.dumps([name, stamp, lr, query_only, vars(args)], sort_keys=True, default=str)
    path = CACHE / f"levers-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    bench = bench_args(args)
    data = fold_data(0, bench)
    model, _ = fit(DiffewSModule(backbone=backbone, lr=lr, query_only=query_only), 0, bench)
    one = data.episodes(False, 1, args.episodes)
    own = evaluate(model.predict, one, False, f"{name} own")
    out = {"heldout_pair_loss": heldout_pair_loss(model, 0, bench), "own": own}
    if not query_only:
        out["move"] = logit_move(model, args)
        out["other"] = evaluate(model.predict, OtherClassSupport(one), False, f"{name} other")
        out["entropy"] = attention_entropy(model, one)
    out["minutes"] = (time.perf_counter() - start) / 60
    CACHE.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(out).encode())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--val-episodes", type=int, default=100)
    parser.add_argument("--val-scenes", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "fewshot_levers.md")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    recipe = str(ensure_backbone(CONFIG))
    longer = str(ensure_backbone(CONFIG, ROOT / ".cache" / "difffeat" / "backbones" / "sd-unet-scenes-attn2-ddpm-3k",
                                 "--trainer.max_steps", str(LONG_PRETRAINING)))
    arms = {"benchmark recipe (lr 2e-4, 600-step U-Net)": (recipe, 2e-4, False),
            "learning rate 1e-3": (recipe, 1e-3, False),
            f"U-Net pretrained {LONG_PRETRAINING} steps": (longer, 2e-4, False),
            "query-only control of the recipe": (recipe, 2e-4, True)}
    rows = ["| arm | held-out pair loss | Δ logits, partner's support (% of std) | novel 1-shot mIoU, own support "
            "| another class's support | own − other [95 % CI] | attention entropy / uniform (16×16) "
            "| U-Net features: 5-way object accuracy, best tap (%) |", "|---|---|---|---|---|---|---|---|"]
    minutes = []
    for name, (backbone, lr, query_only) in arms.items():
        r = run_arm(name, backbone, lr, query_only, args)
        minutes.append(f"{name}: {r['minutes']:.1f}")
        separable = run_cached("feature separability", separability, backbone, 0, bench_args(args))["best"]
        if query_only:
            rows.append(f"| {name} | {r['heldout_pair_loss']:.3f} | 0 by construction | {r['own']['miou']:.1f} | "
                        f"same masks | 0 by construction | – | {separable:.1f} |")
            continue
        gap = paired_gap([r["own"]], [r["other"]])
        rows.append(f"| {name} | {r['heldout_pair_loss']:.3f} | {r['move']:.2f} | {r['own']['miou']:.1f} | "
                    f"{r['other']['miou']:.1f} | {gap[0]:+.1f} [{gap[1]:+.1f}, {gap[2]:+.1f}] | "
                    f"{r['entropy']['16x16'][0]:.3f} | {separable:.1f} |")
    command = " ".join(["python -m experiments.fewshot_levers", *(argv or [])])
    doc = f"""# Levers on DiffewS's support use (fold 0)

Written by `{command}` in {(time.perf_counter() - began) / 60:.1f} min
(cached arms count as 0): {args.steps} steps of 8 one-shot base-class episodes (counterfactual pairs, 15 %
negatives) per arm, seed 0, {SIZE}-px scenes; {args.val_episodes} held-out base-class pair episodes;
{args.episodes} novel-class test episodes.

{chr(10).join(rows)}

CPU minutes per arm, from its first run: {", ".join(minutes)}.
"""
    atomic_write(args.out, doc.encode())
    print(doc)


if __name__ == "__main__":
    main()
