"""The main job (``make run``): a linear-probe study of a diffusion U-Net trained on digits.

1. Train (or reuse) the 16×16 digits U-Net of ``configs/ddpm_digits.yaml`` without labels.
2. Extract the tap grid of ``configs/extract_digits.yaml`` (layers × timesteps, 4×4 pooled) into a
   feature store, for the trained U-Net and for the same architecture untrained (random init).
3. For every label regime and backbone, rank the taps by *validation* accuracy (labelled and
   validation samples both carved from the training split; the test split is not used to choose).
4. Probe (shrinkage LDA, see ``heads/classification.py``) at 1, 5, 10 labels per class and with all
   labels, three labelled-subset seeds, against raw pixels measured in the same run: the best
   validated tap, the posterior average of the three best validated taps, and the 10-per-class tap
   read out with a 4-draw noise ensemble.
5. Write ``experiments/results/probe_digits.md``, a heatmap of accuracy over the tap grid, and the
   README table.

Run: ``make run`` or ``python -m experiments.probe_digits``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from difffeat.backbones import create_backbone
from difffeat.cli import main as difffeat
from difffeat.data import load_digits_split
from difffeat.extract import parse_feature_name
from difffeat.store import FeatureStore
from heads.classification import (
    fit_linear_probes,
    format_cell,
    labelled_subset,
    probe_accuracies,
    probe_ensemble,
    probe_sweep,
    select_by_validation,
    select_weight_decay,
    standardise,
)

ROOT = Path(__file__).resolve().parent.parent
TRAIN_CONFIG = ROOT / "configs/ddpm_digits.yaml"
EXTRACT_CONFIG = ROOT / "configs/extract_digits.yaml"
CACHE = ROOT / ".cache/difffeat"
RESULTS = ROOT / "experiments/results"
REGIMES = (1, 5, 10, 0)  # labels per class; 0 = all labels
SELECT_AT = 10


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def ensure_backbone(config: Path = TRAIN_CONFIG, export_dir: Path | None = None, *overrides: str) -> Path:
    """Trains the backbone of a ``difffeat fit`` config (default: the digits U-Net) unless a model trained
    with the same config is already saved in its ``export_dir``.

    ``overrides`` (``difffeat fit`` arguments, e.g. ``"--trainer.max_steps", "3000"``) change the run and
    are part of the stamp; ``export_dir`` then keeps the variant apart from the config's own folder.
    """
    text = config.read_text()
    folder = export_dir or ROOT / yaml.safe_load(text)["model"]["init_args"]["export_dir"]
    stamp = folder / "difffeat-config.sha256"
    digest = _digest(text, *overrides) if overrides else _digest(text)
    if stamp.exists() and stamp.read_text() == digest:
        print(f"reusing the backbone trained with this config: {folder}")
        return folder
    difffeat(["fit", "--config", str(config), "--model.export_dir", str(folder), *overrides])
    stamp.write_text(digest)
    return folder


def extract(backbone: str, tag: str, *overrides: str) -> dict[str, torch.Tensor]:
    """Fills (or reuses) a store for ``backbone`` under the extract config, returns its tensors."""
    key = _digest(EXTRACT_CONFIG.read_text(), backbone, tag, *overrides,
                  (Path(backbone) / "difffeat-config.sha256").read_text() if Path(backbone).is_dir() else "")
    store = CACHE / "features" / f"digits-{tag}-{key}"
    difffeat(["extract", "--config", str(EXTRACT_CONFIG), "--model.backbone", backbone, "--store", str(store),
              *overrides])
    return FeatureStore.open(store).load()


def evaluate_logreg(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, seeds: list[int]) -> dict[int, list[float]]:
    """Raw-pixel logistic regression, ``λ`` chosen by cross-validation on the labelled samples."""
    tr_idx = train.nonzero().flatten()
    out: dict[int, list[float]] = {}
    for regime in REGIMES:
        for seed in seeds if regime else seeds[:1]:
            pick = tr_idx[labelled_subset(y[tr_idx], regime, seed)]
            lam = select_weight_decay({"x": x[pick]}, y[pick], 10, max_iter=100)
            probe = fit_linear_probes({"x": x[pick]}, y[pick], 10, lam, max_iter=200)
            out.setdefault(regime, []).append(probe_accuracies(probe, {"x": x[~train]}, y[~train])["x"])
    return out


def heatmap(acc: dict[str, dict[int, list[float]]], path: Path, title: str) -> None:
    """Accuracy over layers × timesteps at 10 labels per class and with all labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [parse_feature_name(n) for n in acc]
    layers = list(dict.fromkeys(k[0] for k in keys))
    steps = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, regime, label in zip(axes, (10, 0), ("10 labels / class", "all labels"), strict=True):
        grid = np.array([[100 * np.mean(acc[f"{layer}@t{t}"][regime]) for t in steps] for layer in layers])
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(steps)), [str(t) for t in steps])
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("timestep t (DDPM index, 0 = least noise)")
        ax.set_title(f"{label}: test accuracy (%)")
        for i in range(len(layers)):
            for j in range(len(steps)):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < grid.mean() else "black")
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_readme_table(table: str, marker: str = "probe_digits") -> None:
    """Replaces the README's results table between the ``<!-- {marker}:start/end -->`` comments."""
    readme = ROOT / "README.md"
    if not readme.exists():
        return
    text = readme.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start in text and end in text:
        new = re.sub(f"{start}.*?{end}", lambda _m: f"{start}\n{table}\n{end}", text, flags=re.S)
        readme.write_text(new)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="labelled-subset seeds")
    parser.add_argument("--ensemble", type=int, default=4, help="noise draws for the ensemble row")
    parser.add_argument("--top", type=int, default=3, help="validated taps averaged in the multi-tap row")
    opts = parser.parse_args(args)
    start = time.time()
    phases: dict[str, float] = {}
    torch.manual_seed(0)

    folder = ensure_backbone()
    phases["train or reuse the backbone"] = time.time() - start
    params = sum(p.numel() for p in create_backbone(folder).parameters())
    rows: dict[str, tuple[list[str], dict[int, list[float]]]] = {}

    tick = time.time()
    images, labels = load_digits_split("all")
    n_train = len(load_digits_split("train")[1])
    split = (torch.arange(len(labels)) >= n_train).long()
    raw_feats, y, train = standardise({"pixels": images, "split": split, "label": labels})
    rows["raw pixels, LDA"] = (["16×16 pixels"], probe_sweep(raw_feats, y, train, REGIMES, opts.seeds)["pixels"])
    rows["raw pixels, logistic regression (λ by CV)"] = (
        ["16×16 pixels"], evaluate_logreg(raw_feats["pixels"], y, train, opts.seeds))
    phases["raw-pixel baselines"] = time.time() - tick

    grid_acc, chosen10 = {}, ""
    for tag, backbone, label in (("random", "unet2d-digits", "U-Net untrained (random init)"),
                                 ("trained", str(folder), "U-Net DDPM-trained")):
        tick = time.time()
        feats, y, train = standardise(extract(backbone, tag))
        phases[f"extract the tap grid ({tag})"] = time.time() - tick
        tick = time.time()
        grid_acc[tag] = acc = probe_sweep(feats, y, train, REGIMES, opts.seeds)
        best, top = {}, {}
        for regime in REGIMES:
            _, scores = select_by_validation(feats, y, train, regime, opts.seeds)
            ranked = sorted(scores, key=lambda n: -scores[n])
            best[regime], top[regime] = ranked[0], ranked[: opts.top]
        rows[f"{label}, best validated tap"] = ([best[r] for r in REGIMES], {r: acc[best[r]][r] for r in REGIMES})
        rows[f"{label}, top-{opts.top} validated taps, posteriors averaged"] = (
            [" + ".join(top[r]) for r in REGIMES],
            {r: probe_ensemble(feats, top[r], y, train, r, opts.seeds) for r in REGIMES})
        phases[f"select and probe ({tag})"] = time.time() - tick
        chosen10 = best[10]

    tick = time.time()
    layer, t = parse_feature_name(chosen10)
    ens = extract(str(folder), f"ens{opts.ensemble}", "--model.layers", json.dumps([layer]),
                  "--model.timesteps", json.dumps([t]), "--model.ensemble", str(opts.ensemble))
    feats, y, train = standardise(ens)
    rows[f"U-Net DDPM-trained, {opts.ensemble}-draw noise ensemble of the 10 / class tap"] = (
        [chosen10] * len(REGIMES), probe_sweep(feats, y, train, REGIMES, opts.seeds)[chosen10])
    phases["noise-ensemble extraction and probe"] = time.time() - tick

    regime_names = ["1 / class", "5 / class", "10 / class", "all labels"]
    lines = ["| features | " + " | ".join(regime_names) + " |", "|---" * (len(REGIMES) + 1) + "|"]
    for name, (_, acc) in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_cell(acc[r]) for r in REGIMES) + " |")
    table = "\n".join(lines)
    taps = ["| features | " + " | ".join(regime_names) + " |", "|---" * (len(REGIMES) + 1) + "|"]
    for name, (chosen, _) in rows.items():
        if not name.startswith("raw"):
            taps.append(f"| {name} | " + " | ".join(f"`{c}`" for c in chosen) + " |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    heatmap(grid_acc["trained"], RESULTS / "probe_digits_heatmap.png",
            "DDPM-trained digits U-Net: LDA probe on 4×4-pooled taps (mean of 3 seeds)")
    layers = list(dict.fromkeys(parse_feature_name(n)[0] for n in grid_acc["trained"]))
    steps = sorted({parse_feature_name(n)[1] for n in grid_acc["trained"]})
    sweep = ["| layer | " + " | ".join(f"t={s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for tag in ("trained", "random"):
        sweep.append(f"| **{tag}** |" + " |" * len(steps))
        for lay in layers:
            cells = [f"{format_cell(grid_acc[tag][f'{lay}@t{s}'][10])} / {format_cell(grid_acc[tag][f'{lay}@t{s}'][0])}"
                     for s in steps]
            sweep.append(f"| `{lay}` | " + " | ".join(cells) + " |")
    elapsed = time.time() - start
    timing = "\n".join(f"| {k} | {v:.0f} s |" for k, v in phases.items())
    doc = f"""# Digits linear-probe study

Written by `python -m experiments.probe_digits` (`make run`); rerun that command to reproduce.

scikit-learn's handwritten digits upsampled to 16×16, fixed stratified 70/30 split (seed 0): 1,257
train / 540 test images. The U-Net ({params / 1e6:.2f} M parameters, `configs/ddpm_digits.yaml`) is
trained on the train images without labels. Features: every tap of `configs/extract_digits.yaml`
(7 layers × 7 timesteps), 4×4 adaptive average pooling, standardised with unlabelled train statistics.
Probe: shrinkage LDA (closed form, no hyperparameter). Test accuracy (%), mean ± std over
labelled-subset seeds {opts.seeds} (all labels: one deterministic run).

Taps are chosen per label regime by validation accuracy: a stratified third of the *training* split is
held out (two such splits), labelled subsets come from the rest, and the test split is used only for
the numbers below.

{table}

Taps chosen on validation:

{chr(10).join(taps)}

Whole job: {elapsed / 60:.1f} min on this machine.

| phase | time |
|---|---|
{timing}

## Every tap (10 labels / class  /  all labels)

![accuracy over taps and timesteps](probe_digits_heatmap.png)

{chr(10).join(sweep)}
"""
    (RESULTS / "probe_digits.md").write_text(doc)
    write_readme_table(table)
    print(table)
    print(f"wrote {RESULTS / 'probe_digits.md'} in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
