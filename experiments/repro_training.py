"""Miniature reproduction of the training-side techniques on digits: vanilla SiT vs DDAE++
self-conditioning vs REPA vs HASTE.

Every arm is the same pixel-space DiT (``dit-digits``) with the same flow objective, step budget,
batch size, learning-rate schedule and seeds; the arms differ only by their plug-in (see the configs
``configs/sit_digits*.yaml``). HASTE stops its alignment at a third of the budget (its config's
``stop_step`` is overridden to ``steps // 3``). At several
checkpoints (EMA weights) each run is measured by

* FD-digits (:mod:`difffeat.metrics`) of 540 samples (Euler, 25 steps) against the 540 test digits;
* linear-probe test accuracy (shrinkage LDA, token-mean taps of blocks 2, 4, 6 at t = 100 and 300; the
  tap chosen per regime on a validation split of the training split, as in the main job) at
  10 labels per class and with all labels.

Run: ``python -m experiments.repro_training`` (needs the teacher: ``difffeat fit --config
configs/teacher_digits.yaml``). Writes ``experiments/results/repro_training.md`` and a plot of the curves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from difffeat.backbones import create_backbone
from difffeat.cli import main as difffeat
from difffeat.data import DigitsDataset
from difffeat.extract import FeatureExtractor, feature_name
from difffeat.metrics import fd_digits, load_fd_network
from difffeat.readout import TokenMean
from difffeat.sample import sample
from heads.classification import format_cell, probe_sweep, select_by_validation, standardise

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"vanilla": "sit_digits", "self-conditioning": "sit_digits_selfcond", "REPA": "sit_digits_repa",
        "HASTE": "sit_digits_haste"}
RUNS = ROOT / ".cache/difffeat/repro"
RESULTS = ROOT / "experiments/results"
TAPS = ["transformer_blocks.1", "transformer_blocks.3", "transformer_blocks.5"]
TIMESTEPS = [100, 300]


def train(arm: str, seed: int, steps: int, every: int, runs: Path) -> Path:
    """Trains one arm with one seed (skipped when its final export exists); HASTE stops at steps // 3."""
    out = runs / f"{ARMS[arm]}-{steps}steps-seed{seed}"
    extra = ["--model.alignment.stop_step", str(steps // 3)] if arm == "HASTE" else []
    if (out / "model_index.json").exists():
        return out
    difffeat(["fit", "--config", str(ROOT / "configs" / f"{ARMS[arm]}.yaml"), "--seed_everything", str(seed),
              "--model.backbone_kwargs", json.dumps({"seed": seed}), "--model.export_dir", str(out),
              "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks+=difffeat.train.PeriodicExport", f"--trainer.callbacks.every_n_steps={every}",
              *extra])
    return out


@torch.no_grad()
def evaluate(folder: Path, seeds: list[int], fd_net: torch.nn.Module) -> dict[str, float | list[float]]:
    """FD-digits and probe accuracies of one checkpoint."""
    backbone = create_backbone(folder)
    fd = fd_digits(sample(backbone, 540, steps=25, seed=0), net=fd_net)
    data = DigitsDataset("all")
    extractor = FeatureExtractor(backbone, TAPS, TIMESTEPS, readout=TokenMean())
    parts = [extractor(data.images[i:i + 256], range(i, min(i + 256, len(data)))) for i in range(0, len(data), 256)]
    split = (torch.arange(len(data)) >= data.num_train).long()
    feats, labels, train_mask = standardise({**{feature_name(k): torch.cat([p[k] for p in parts]) for k in parts[0]},
                                             "split": split, "label": data.labels})
    out: dict[str, float | list[float]] = {"fd": fd}
    acc = probe_sweep(feats, labels, train_mask, (10, 0), seeds)
    for regime in (10, 0):
        chosen, _ = select_by_validation(feats, labels, train_mask, regime, seeds)
        out[f"acc{regime}"] = acc[chosen][regime]
    return out


def _step(folder: Path) -> int:
    return int(folder.name.rsplit("step", 1)[1])


def plot(curves: dict[str, dict[int, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for arm, per_step in curves.items():
        steps = sorted(per_step)
        for ax, key, label in zip(axes, ("fd", "acc10", "acc0"),
                                  ("FD-digits (lower is better)", "probe, 10 labels / class (%)",
                                   "probe, all labels (%)"), strict=True):
            vals = [[np.mean(r[key]) * (1 if key == "fd" else 100) for r in per_step[s]] for s in steps]
            mean, std = np.array([np.mean(v) for v in vals]), np.array([np.std(v) for v in vals])
            ax.plot(steps, mean, marker="o", label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
            ax.set_title(label)
            ax.set_xlabel("training step")
    axes[0].legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=200, help="checkpoint period (steps)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs", default=str(RUNS), help="where trained runs are kept (and reused)")
    parser.add_argument("--out", default=str(RESULTS), help="where the table and plot go")
    opts = parser.parse_args(args)
    start = time.time()
    fd_net = load_fd_network()
    curves: dict[str, dict[int, list[dict]]] = {}
    for arm in opts.arms:
        for seed in opts.seeds:
            tick = time.time()
            final = train(arm, seed, opts.steps, opts.every, Path(opts.runs))
            for ckpt in sorted(final.parent.glob(f"{final.name}-step*"), key=_step):
                curves.setdefault(arm, {}).setdefault(_step(ckpt), []).append(evaluate(ckpt, opts.seeds, fd_net))
            print(f"{arm} seed {seed}: {time.time() - tick:.0f} s", flush=True)

    results = Path(opts.out)
    results.mkdir(parents=True, exist_ok=True)
    plot(curves, results / "repro_training.png")
    steps = sorted(next(iter(curves.values())))
    lines = ["| arm | step | FD-digits ↓ | probe 10 / class (%) | probe all labels (%) |", "|---|---|---|---|---|"]
    for arm, per_step in curves.items():
        for s in steps:
            runs = per_step[s]
            fd = np.array([r["fd"] for r in runs])
            acc10 = [float(np.mean(r["acc10"])) for r in runs]
            acc0 = [float(np.mean(r["acc0"])) for r in runs]
            lines.append(f"| {arm} | {s} | {fd.mean():.2f} ± {fd.std():.2f} | {format_cell(acc10)} | "
                         f"{format_cell(acc0)} |")
    doc = f"""# Training-side techniques on digits: vanilla SiT, self-conditioning, REPA, HASTE

Written by `python -m experiments.repro_training` (rerun it to reproduce; {len(opts.seeds)} seeds
{opts.seeds}, {opts.steps} steps of batch 64 per run, checkpoints every {opts.every} steps, EMA weights;
HASTE's alignment stops at step {opts.steps // 3}).
Mean ± std over training seeds; probe accuracies are themselves means over labelled-subset seeds.

{chr(10).join(lines)}

![curves](repro_training.png)

Whole study: {(time.time() - start) / 60:.1f} min on this machine.
"""
    (results / "repro_training.md").write_text(doc)
    print(doc)


if __name__ == "__main__":
    main()
