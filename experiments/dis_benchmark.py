"""Dichotomous image segmentation on the generated thin-structure scenes: DiffDIS-style vs three baselines.

Methods, each built from its ``difffeat fit`` config (so a config and its benchmark row are one model):

* ``DiffDIS-style`` (:file:`configs/dis_diffdis.yaml`): the one-step segmenter of :mod:`heads.dis`,
  fine-tuned whole from the diffusion-pretrained scenes U-Net, with the edge auxiliary;
* ``(a) SMP U-Net, untrained encoder`` (:file:`configs/dis_smp_unet.yaml`): ``tu-resnet18``, random init;
* ``(b) SMP U-Net / FPN, frozen diffusion`` (:file:`configs/dis_smp_frozen_unet.yaml`,
  :file:`configs/dis_smp_frozen_fpn.yaml`): SMP decoders on the frozen encoder of the same U-Net;
* ``(c) DiffDIS-style, no edge`` (:file:`configs/dis_diffdis_noedge.yaml`): ``edge_weight`` 0.

Protocol: every method trains for the same number of steps on the same batches (same seed → same
training scenes in the same order; ``--steps`` × ``--batch-size`` images, ``--size`` px), with the
DiffDIS module's loss (SMP BCE + Dice; DiffDIS adds its edge term), no validation, no early stopping.
It is then tested with the DIS suite (:class:`heads.dis_metrics.DISMetrics`, every metric, HCE included)
on two held-out generated sets of the test seed: ``test`` at the training difficulty and ``hardest`` at
difficulty 1 (1-px strokes, densest wires and hair, lowest contrast). Three seeds (initialisation,
batch order, training-noise draws); the table gives mean ± std over seeds (sample std), the CPU minutes
(process CPU time: all threads) per run, and verdicts computed from the per-seed numbers.

The diffusion backbone is the scenes U-Net that :file:`configs/ddpm_scenes.yaml` pretrains on unlabelled
scenes (trained here first if missing, by :func:`experiments.probe_digits.ensure_backbone`); ``--backbone``
replaces it (e.g. ``sd-unet-scenes``, the random-init architecture, for a smoke run).

CPU cost notes: the frozen encoder of (b) runs its forwards unpadded (``pad_rows=False``, the module's
default), so a 4-image training batch costs a 4-row forward rather than a :data:`difffeat.extract.CPU_ROWS`-row
one; evaluation uses ``--eval-batch`` (32 by default).

Rerun: ``python -m experiments.dis_benchmark`` (writes ``experiments/results/dis_benchmark.md`` and
``dis_benchmark_examples.png``; each finished (method, seed) is cached as JSON under ``.cache/difffeat/dis``
keyed by its settings, config and backbone, and reused by a rerun with the same ones).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from difffeat.store import atomic_write
from heads.dis_metrics import DIS_METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache/difffeat/dis"
RESULTS = ROOT / "experiments/results"
BACKBONE_CONFIG = ROOT / "configs/ddpm_scenes.yaml"
VERSION = 1  # bump when a run's procedure changes: cached results of older versions are not reused

#: method label -> (short name for --methods, config file)
METHODS: dict[str, tuple[str, str]] = {
    "DiffDIS-style": ("diffdis", "configs/dis_diffdis.yaml"),
    "(a) SMP U-Net, untrained encoder": ("smp_unet", "configs/dis_smp_unet.yaml"),
    "(b) SMP U-Net, frozen diffusion": ("frozen_unet", "configs/dis_smp_frozen_unet.yaml"),
    "(b) SMP FPN, frozen diffusion": ("frozen_fpn", "configs/dis_smp_frozen_fpn.yaml"),
    "(c) DiffDIS-style, no edge": ("noedge", "configs/dis_diffdis_noedge.yaml"),
}
SPLITS = ("test", "hardest")
#: metrics where lower is better
LOWER_IS_BETTER = frozenset({"mae", "hce"})
# settings that do not change a (method, seed) result
_NOT_IN_KEY = ("seeds", "methods", "out", "backbone", "figure_images")


# ------------------------------------------------------------------------------------------------ runs


def build_module(config: str | Path, backbone: str | None, size: int) -> Any:
    """The LightningModule of a DIS config, its backbone replaced by ``backbone`` and its default size ``size``."""
    from difffeat.cli import dis_module_classes

    spec = yaml.safe_load((ROOT / config).read_text())["model"]
    init = dict(spec.get("init_args") or {})
    if "backbone" in init and backbone is not None:
        init["backbone"] = backbone
    if "image_size" in init:
        init["image_size"] = size
    return dis_module_classes()[spec["class_path"]](**init)


def _png(p: torch.Tensor) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((p.clamp(0, 1) * 255).to(torch.uint8).numpy(), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unpng(data: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        return np.asarray(img, dtype=np.float32) / 255


def evaluation_sets(args: argparse.Namespace) -> dict[str, Any]:
    """The two held-out generated test sets: the training difficulty and the hardest one."""
    from difffeat.data.dis import DISScenes

    return {"test": DISScenes.split("test", args.test_images, args.size, args.difficulty),
            "hardest": DISScenes.split("test", args.test_images, args.size, args.hard_difficulty)}


def run_method(label: str, seed: int, backbone: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Trains one method for ``args.steps`` steps with ``seed``, tests it on both sets, keeps a few predictions."""
    import lightning as L
    from torch.utils.data import DataLoader

    from difffeat.data.dis import DISDataModule

    L.seed_everything(seed, verbose=False)
    module = build_module(METHODS[label][1], backbone, args.size)
    data = DISDataModule(size=args.size, batch_size=args.batch_size, lengths=(args.train_scenes, 1, 1),
                         difficulty=args.difficulty)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    sets = evaluation_sets(args)
    trainer.test(module, dataloaders=[DataLoader(d, args.eval_batch) for d in sets.values()], verbose=False)
    scores: dict[str, dict[str, float]] = {s: {} for s in SPLITS}
    for key, value in trainer.callback_metrics.items():
        parts = key.split("/dataloader_idx")[0].split("/")
        if len(parts) == 3 and parts[0] == "test":
            scores[SPLITS[int(parts[1])]][parts[2]] = float(value)
    module.eval()
    examples = {}
    for split, d in sets.items():
        n = min(args.figure_images, len(d))
        images = torch.stack([d[i]["image"] for i in range(n)])
        examples[split] = [_png(p[0]) for p in module.predict(images, module.tta_flip, module.tta_scales)]
    return {"scores": scores, "examples": examples}


def _stamp(backbone: str | None) -> str:
    if backbone is None:
        return "config"
    stamp = Path(backbone) / "difffeat-config.sha256"
    return stamp.read_text() if stamp.exists() else backbone


def cache_key(label: str, seed: int, backbone: str | None, args: argparse.Namespace) -> str:
    """The cache key of one (method, seed): its config text, backbone, seed, settings and :data:`VERSION`.

    A method whose config has no ``backbone`` (the untrained-encoder SMP U-Net) does not depend on it.
    """
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_IN_KEY}
    config = (ROOT / METHODS[label][1]).read_text()
    if "backbone" not in (yaml.safe_load(config)["model"].get("init_args") or {}):
        backbone = None
    return hashlib.sha256(json.dumps([label, config, _stamp(backbone), seed, settings, VERSION],
                                     sort_keys=True).encode()).hexdigest()[:16]


def run_cached(label: str, seed: int, backbone: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """One (method, seed), reused from ``.cache/difffeat/dis`` when run before with the same settings."""
    path = CACHE / f"{METHODS[label][0]}-{cache_key(label, seed, backbone, args)}.json"
    if not path.exists():
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_method(label, seed, backbone, args)
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - wall, time.process_time() - cpu
        CACHE.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result).encode())
        print(f"{label}, seed {seed}: {result['cpu_seconds'] / 60:.1f} CPU min", flush=True)
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- numbers


def aggregate(runs: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, sample std)}`` over seeds (std 0 for one seed); metrics missing in a run are skipped."""
    names = [m for m in runs[0] if all(m in r for r in runs)]
    out = {}
    for m in names:
        v = np.array([r[m] for r in runs], dtype=np.float64)
        out[m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return out


def paired_verdict(ours: Sequence[float], theirs: Sequence[float], metric: str) -> tuple[str, float, int]:
    """Whether ``ours`` beats ``theirs`` on ``metric`` over paired seeds.

    Returns:
        ``(verdict, mean improvement, seeds improved)``; the improvement is signed so that > 0 is better
        (``theirs - ours`` for lower-is-better metrics). ``"supported"``: better in every seed;
        ``"not supported"``: not better on average; ``"mixed"``: better on average, not in every seed.
    """
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired seeds needed, got {len(ours)} and {len(theirs)} values")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    gain = sign * (np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64))
    wins = int((gain > 0).sum())
    verdict = "supported" if wins == len(gain) else "not supported" if gain.mean() <= 0 else "mixed"
    return verdict, float(gain.mean()), wins


def thin_crop(mask: np.ndarray, window: int) -> tuple[int, int]:
    """Top-left corner of the ``window`` × ``window`` crop holding the most thin-structure pixels.

    Thin pixels are mask pixels a 3 × 3 opening removes (strokes up to 2 px wide); a mask without any falls
    back to the crop with the most mask pixels.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    window = min(window, h, w)
    thin = mask & ~ndimage.binary_opening(mask, structure=np.ones((3, 3), dtype=bool))
    target = thin if thin.any() else mask
    counts = ndimage.uniform_filter(target.astype(np.float64), size=window, mode="constant")
    half = window // 2
    valid = counts[half:h - window + half + 1, half:w - window + half + 1]  # centres of crops inside the image
    y, x = np.unravel_index(int(np.argmax(valid)), valid.shape)
    return int(y), int(x)


def _cell(mean: float, std: float, metric: str) -> str:
    return f"{mean:.1f} ± {std:.1f}" if metric == "hce" else f"{mean:.3f} ± {std:.3f}"


def table(results: dict[str, list[dict[str, Any]]], split: str) -> str:
    """Markdown: every DIS metric, mean ± std over seeds, per method."""
    arrows = [f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in DIS_METRIC_NAMES]
    lines = ["| method | " + " | ".join(arrows) + " |", "|---|" + "---|" * len(DIS_METRIC_NAMES)]
    for label, runs in results.items():
        agg = aggregate([r["scores"][split] for r in runs])
        lines.append(f"| {label} | " + " | ".join(_cell(*agg[m], m) if m in agg else "" for m in DIS_METRIC_NAMES)
                     + " |")
    return "\n".join(lines)


#: the README's summary columns: the overall, boundary-sensitive and error metrics
SUMMARY_METRICS = ("fm_max", "wfm", "sm", "em_mean", "mae", "hce")


def summary_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown for the README: the summary metrics on both splits, mean ± std over seeds."""
    arrows = [f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in SUMMARY_METRICS]
    lines = ["| split | method | " + " | ".join(arrows) + " |", "|---|---|" + "---|" * len(SUMMARY_METRICS)]
    for split in SPLITS:
        for label, runs in results.items():
            agg = aggregate([r["scores"][split] for r in runs])
            lines.append(f"| {split} | {label} | " + " | ".join(_cell(*agg[m], m) if m in agg else ""
                                                                 for m in SUMMARY_METRICS) + " |")
    return "\n".join(lines)


def cost_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: CPU and wall minutes per run (mean over seeds) and in all, per method."""
    lines = ["| method | CPU min per run | wall min per run | CPU min, all seeds |", "|---|---|---|---|"]
    for label, runs in results.items():
        cpu = [r["cpu_seconds"] / 60 for r in runs]
        wall = [r["seconds"] / 60 for r in runs]
        lines.append(f"| {label} | {np.mean(cpu):.1f} | {np.mean(wall):.1f} | {np.sum(cpu):.1f} |")
    return "\n".join(lines)


def verdicts(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The two claims, decided from the per-seed numbers (methods that were not run are skipped)."""
    lines = []
    claims = [("the edge auxiliary improves the boundary-sensitive metrics", "DiffDIS-style",
               "(c) DiffDIS-style, no edge", ("wfm", "hce")),
              ("diffusion features beat an untrained encoder at equal budget (same U-Net decoder)",
               "(b) SMP U-Net, frozen diffusion", "(a) SMP U-Net, untrained encoder", ("wfm", "fm_max", "mae")),
              ("diffusion features beat an untrained encoder at equal budget (DiffDIS-style)", "DiffDIS-style",
               "(a) SMP U-Net, untrained encoder", ("wfm", "fm_max", "mae"))]
    for claim, ours, theirs, metrics in claims:
        if ours not in results or theirs not in results:
            continue
        for split in SPLITS:
            for m in metrics:
                a = [r["scores"][split][m] for r in results[ours]]
                b = [r["scores"][split][m] for r in results[theirs]]
                verdict, gain, wins = paired_verdict(a, b, m)
                lines.append(f"- {claim} — {ours} vs {theirs}, `{m}` on `{split}`: **{verdict}** (improvement "
                             f"{gain:+.4g} on average, better in {wins} of {len(a)} seeds)")
    return lines


# ------------------------------------------------------------------------------------------- figure


def _overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The dimmed image with true positives green, false positives red and false negatives blue (p > 0.5)."""
    out = 0.35 * image.copy()
    p = pred > 0.5
    for where, colour in ((p & gt, (0.1, 0.9, 0.1)), (p & ~gt, (1.0, 0.15, 0.15)), (~p & gt, (0.2, 0.4, 1.0))):
        out[where] = colour
    return out


def figure(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, path: Path) -> None:
    """Image / ground truth / each method's prediction (first seed) on the hardest split, with thin-part crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    scenes = evaluation_sets(args)["hardest"]
    n = min(args.figure_images, len(scenes))
    labels = list(results)
    cols = 2 + len(labels)
    fig, axes = plt.subplots(2 * n, cols, figsize=(2.0 * cols, 4.1 * n), squeeze=False)
    window = max(16, args.size // 4)
    for i in range(n):
        item = scenes[i]
        image = ((item["image"].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
        gt = item["mask"][0].numpy() > 0.5
        y, x = thin_crop(gt, window)
        crop = (slice(y, y + window), slice(x, x + window))
        panels = [("image", image), ("ground truth", np.repeat(gt[..., None], 3, -1).astype(np.float32))]
        panels += [(label, _overlay(image, _unpng(results[label][0]["examples"]["hardest"][i]), gt))
                   for label in labels]
        for c, (title, panel) in enumerate(panels):
            top, bottom = axes[2 * i, c], axes[2 * i + 1, c]
            top.imshow(panel, interpolation="nearest")
            top.add_patch(Rectangle((x - 0.5, y - 0.5), window, window, fill=False, edgecolor="yellow",
                                   linewidth=0.8))
            bottom.imshow(panel[crop], interpolation="nearest")
            if i == 0:
                top.set_title(title, fontsize=7)
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * i + 1, 0].set_ylabel("zoom", fontsize=7)
    fig.suptitle("hardest split (difficulty 1): green TP, red FP, blue FN at p > 0.5; seed "
                 f"{args.seeds[0]}; yellow box = zoom", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line settings (the defaults are the reported study's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # sized from measured costs on 2 unloaded cores, one thread per process: at 40 steps the whole study (5 methods
    # x 3 seeds, testing included) took 12.8 CPU min (experiments/results/dis_40steps/), DiffDIS 2.2 min a run;
    # 300 steps, what configs/dis_*.yaml train for, is the reported budget
    p.add_argument("--steps", type=int, default=300, help="training steps per method (same for all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="scene side (train and test)")
    p.add_argument("--train-scenes", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=48, help="images per test split")
    p.add_argument("--difficulty", type=float, default=0.5, help="training and `test` difficulty")
    p.add_argument("--hard-difficulty", type=float, default=1.0, help="difficulty of the `hardest` split")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=[s for s, _ in METHODS.values()],
                   choices=[s for s, _ in METHODS.values()])
    p.add_argument("--backbone", default=None, help="diffusion U-Net (default: configs/ddpm_scenes.yaml's, "
                                                    "trained if missing)")
    p.add_argument("--figure-images", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the report and the figure")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Runs (or reuses) every (method, seed), writes the report and the figure; returns the runs."""
    args = parse_args(argv)
    command = "python -m experiments.dis_benchmark " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    backbone = args.backbone
    if backbone is None:
        from experiments.probe_digits import ensure_backbone

        backbone = str(ensure_backbone(BACKBONE_CONFIG))
    chosen = [label for label, (short, _) in METHODS.items() if short in args.methods]
    results = {label: [run_cached(label, seed, backbone, args) for seed in args.seeds] for label in chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    figure(results, args, args.out / "dis_benchmark_examples.png")
    total = sum(r["cpu_seconds"] for runs in results.values() for r in runs) / 60
    text = "\n".join([
        "# DIS benchmark: DiffDIS-style vs SMP baselines on generated thin-structure scenes", "",
        f"Rerun: `{command.strip()}` (cached per (method, seed) under `.cache/difffeat/dis/`).", "",
        f"Settings: {args.steps} training steps × batch {args.batch_size} at {args.size} px from "
        f"{args.train_scenes} training scenes (difficulty {args.difficulty}); seeds {args.seeds}; backbone "
        f"`{backbone}`; {args.test_images} test images per split (test seed; `test` at difficulty "
        f"{args.difficulty}, `hardest` at {args.hard_difficulty}); every metric of `DISMetrics` "
        f"(PySODMetrics), mean ± sample std over seeds. CPU minutes in all: {total:.1f}.", "",
        "## Test split (training difficulty)", "", table(results, "test"), "",
        f"## Hardest split (difficulty {args.hard_difficulty})", "", table(results, "hardest"), "",
        "## Cost", "", cost_table(results), "",
        "## Verdicts (computed from the per-seed numbers)", "", *(verdicts(results) or ["- (methods missing)"]), "",
        "![examples](dis_benchmark_examples.png)", ""])
    atomic_write(args.out / "dis_benchmark.md", text.encode())
    if args.out == RESULTS:  # the reported study (not a smoke or side run) also fills the README's table
        from experiments.probe_digits import write_readme_table

        seeds = ", ".join(map(str, args.seeds))
        write_readme_table(f"{summary_table(results)}\n\n({args.steps} steps × batch {args.batch_size} at "
                           f"{args.size} px, seeds {seeds}; `{command.strip()}`)", marker="dis")
    print(text)
    return results


if __name__ == "__main__":
    main()
