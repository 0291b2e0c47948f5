"""CT standardization on simulated scanners: no-op vs a direct U-Net vs DiffusionCT's two-stage latent DDPM.

The claim under test (DiffusionCT, Selim et al. 2023): standardizing scans to one protocol raises the
concordance of radiomic texture features across protocols.

Methods, each built from its ``difffeat fit`` config (so a config and its row are one model):

* ``no-op``: the non-standard scan itself (the "before" of every CCC);
* ``direct U-Net`` (:file:`configs/ct_unet.yaml`): SMP U-Net residual regression, trained for as many
  steps as the two stages together (same batch size and data);
* ``two-stage (DiffusionCT)`` (:file:`configs/ct_stage1.yaml` then :file:`configs/ct_stage2.yaml`): stage 1
  trains the encoder–decoder for ``--stage1-steps``, stage 2 the latent DDPM for ``--stage2-steps`` on the
  frozen stage 1.

Data (:mod:`difffeat.data.ct`): training pairs from ``--train-phantoms`` phantoms of the training seed
under the four training protocols and the standard itself; testing on ``--test-phantoms`` **held-out**
phantoms of the test seed (the real slice ``CT_small.dcm`` among them), reported separately for the four
**seen** protocols and the **held-out** protocol (cosine filter, a dose and slice blur never seen in
training). Metrics (:mod:`heads.ct_metrics`): PSNR / SSIM against the standard scan on the clipped
2048-HU range; per feature (GLCM and first-order in the lung and soft-tissue ROIs) Lin's CCC between the
method's outputs and the standard scans over every (phantom, protocol) pair of the group. Three seeds
(initialisation, batch order, diffusion noise); mean ± sample std over seeds; verdicts from the per-seed
numbers.

Rerun: ``python -m experiments.ct_standardization`` (writes ``experiments/results/ct_standardization.md`` and
``ct_standardization.png``); ``--smoke`` runs a tiny version (32-px slices, a few steps, one seed) into
``ct_standardization_smoke.{md,png}``. Each finished (method, seed) is cached as JSON under
``.cache/difffeat/ct_standardization`` keyed by its settings and configs, and reused by a rerun with the same ones.
"""

from __future__ import annotations

import argparse
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
from heads.ct_metrics import FEATURE_NAMES

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache/difffeat/ct_standardization"
RESULTS = ROOT / "experiments/results"
VERSION = 2  # bump when a run's procedure changes: cached results of older versions are not reused
METHODS = ("no-op", "direct U-Net", "two-stage (DiffusionCT)")
CONFIGS = {"direct U-Net": ("configs/ct_unet.yaml",),
           "two-stage (DiffusionCT)": ("configs/ct_stage1.yaml", "configs/ct_stage2.yaml")}
GROUPS = ("seen protocols", "held-out protocol")
_NOT_IN_KEY = ("seeds", "out", "smoke", "figure_phantom")


# ------------------------------------------------------------------------------------------------ runs


def _init_args(config: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / config).read_text())["model"].get("init_args") or {})


def test_set(args: argparse.Namespace) -> Any:
    """The held-out phantoms under the seen protocols and the held-out one."""
    from difffeat.data.ct import SimulatedScanners

    return SimulatedScanners.split("test", args.test_phantoms, args.size)


def _fit(module: Any, steps: int, seed: int, args: argparse.Namespace) -> None:
    import lightning as L

    from difffeat.data.ct import CTDataModule

    L.seed_everything(seed, verbose=False)
    data = CTDataModule(size=args.size, batch_size=args.batch_size, phantoms=(args.train_phantoms, 1, 1))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=data.train_dataloader())


def train(label: str, seed: int, args: argparse.Namespace, workdir: Path) -> Any:
    """Trains one method from its config(s) and returns the standardizing module (eval mode)."""
    import lightning as L

    from heads.ct import CTAutoencoderModule, DiffusionCTModule, UNetStandardizerModule

    if label == "direct U-Net":
        init = {**_init_args(CONFIGS[label][0]), "image_size": args.size, "export_dir": None, "seed": seed}
        L.seed_everything(seed, verbose=False)
        module = UNetStandardizerModule(**init)
        _fit(module, args.stage1_steps + args.stage2_steps, seed, args)
        return module.eval()
    s1 = {**_init_args(CONFIGS[label][0]), "image_size": args.size, "export_dir": str(workdir / "stage1"),
          "seed": seed}
    L.seed_everything(seed, verbose=False)
    stage1 = CTAutoencoderModule(**s1)
    _fit(stage1, args.stage1_steps, seed, args)
    s2 = {**_init_args(CONFIGS[label][1]), "checkpoint": str(workdir / "stage1"), "image_size": args.size,
          "export_dir": None, "seed": seed}
    if args.sample_steps is not None:
        s2["sample_steps"] = args.sample_steps
    L.seed_everything(seed, verbose=False)
    stage2 = DiffusionCTModule(**s2)
    _fit(stage2, args.stage2_steps, seed, args)
    return stage2.eval()


def _scores(outputs: np.ndarray, data: Any) -> dict[str, Any]:
    """Per-item PSNR, SSIM and features of ``(N, H, W)`` HU outputs against the standard scans."""
    from tqdm import tqdm

    from heads.ct_metrics import psnr_ssim, texture_features

    psnr, ssim, feats, protocol = [], [], [], []
    for i in tqdm(range(len(data)), desc="scoring", leave=False):
        item = data[i]
        out = torch.from_numpy(outputs[i])[None, None]
        p, s = psnr_ssim(out, item["target_hu"][None])
        psnr.append(float(p[0]))
        ssim.append(float(s[0]))
        feats.append(texture_features(outputs[i], item["labels"].numpy()).tolist())
        protocol.append(int(item["protocol"]))
    return {"psnr": psnr, "ssim": ssim, "features": feats, "protocol": protocol}


@torch.no_grad()
def run_method(label: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Trains (unless no-op) and scores one method on the test set; keeps the figure phantom's outputs."""
    from difffeat.data.ct import denormalize_hu

    data = test_set(args)
    sources = torch.stack([data[i]["source"] for i in range(len(data))])
    if label == "no-op":
        outputs = denormalize_hu(sources)[:, 0].numpy()
    else:
        with torch.enable_grad():
            module = train(label, seed, args, workdir)
        outputs = torch.cat([denormalize_hu(module.standardize(b)) for b in sources.split(args.eval_batch)])
        outputs = outputs[:, 0].numpy()
    result = _scores(outputs, data)
    k = len(data.protocols)
    fig = outputs[args.figure_phantom * k:(args.figure_phantom + 1) * k]
    result["figure"] = np.round(fig).astype(int).tolist()
    return result


def cache_key(label: str, seed: int, args: argparse.Namespace) -> str:
    """The cache key of one (method, seed): its config texts, seed, settings and :data:`VERSION`."""
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_IN_KEY}
    from difffeat.data import ct

    configs = [(ROOT / c).read_text() for c in CONFIGS.get(label, ())]
    data = repr((ct.STANDARD, ct.TRAIN_PROTOCOLS, ct.HELD_OUT_PROTOCOL, ct.HU_RANGE))  # the simulated scanners
    return hashlib.sha256(json.dumps([label, configs, data, seed, settings, VERSION], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def run_cached(label: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (method, seed), reused from the cache when run before with the same settings."""
    key = cache_key(label, seed, args)
    path = CACHE / f"{label.split()[0].strip('()-').lower() or 'noop'}-{key}.json"
    if not path.exists():
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_method(label, seed, args, CACHE / f"work-{key}")
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - wall, time.process_time() - cpu
        CACHE.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result).encode())
        print(f"{label}, seed {seed}: {result['cpu_seconds'] / 60:.1f} CPU min", flush=True)
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- numbers


def group_mask(run: dict[str, Any], group: str, held_out: int) -> np.ndarray:
    """Items of a group: the seen protocols, or the held-out one (protocol index ``held_out``)."""
    p = np.asarray(run["protocol"])
    return p == held_out if group == GROUPS[1] else p != held_out


def group_scores(run: dict[str, Any], reference: np.ndarray, group: str, held_out: int) -> dict[str, Any]:
    """PSNR, SSIM (means) and per-feature CCC against the standard scans' features, for one run and group."""
    from heads.ct_metrics import concordance

    m = group_mask(run, group, held_out)
    ccc = concordance(np.asarray(run["features"], dtype=np.float64)[m], reference[m])
    finite = [v for v in ccc.values() if np.isfinite(v)]
    between = inter_protocol_ccc(run, group, held_out)
    finite_between = [v for v in between.values() if np.isfinite(v)]
    return {"psnr": float(np.mean(np.asarray(run["psnr"])[m])), "ssim": float(np.mean(np.asarray(run["ssim"])[m])),
            "ccc": ccc, "ccc_mean": float(np.mean(finite)) if finite else float("nan"),
            "between": between, "between_mean": float(np.mean(finite_between)) if finite_between else float("nan")}


def inter_protocol_ccc(run: dict[str, Any], group: str, held_out: int) -> dict[str, float]:
    """Per-feature CCC *between protocols*: the same phantoms' features under two protocols, paired.

    The test items are phantom-major (item ``i`` is phantom ``i // k`` under protocol ``i % k``). Seen group:
    every pair of seen protocols; held-out group: the held-out protocol against each seen one. Per feature,
    the mean CCC over the pairs (NaN pairs left out): 1 when the features no longer depend on the protocol.
    """
    from heads.ct_metrics import concordance

    k = held_out + 1
    feats = np.asarray(run["features"], dtype=np.float64)
    feats = feats.reshape(len(feats) // k, k, feats.shape[1])
    seen = range(held_out)
    pairs = ([(p, q) for p in seen for q in seen if p < q] if group == GROUPS[0] else [(held_out, p) for p in seen])
    per_pair = [concordance(feats[:, p], feats[:, q]) for p, q in pairs]
    out = {}
    for f in FEATURE_NAMES:
        v = [c[f] for c in per_pair if np.isfinite(c[f])]
        out[f] = float(np.mean(v)) if v else float("nan")
    return out


def reference_features(args: argparse.Namespace) -> np.ndarray:
    """Features of the standard scans of the test set (one row per item)."""
    from heads.ct_metrics import texture_features

    data = test_set(args)
    return np.array([texture_features(data[i]["target_hu"][0].numpy(), data[i]["labels"].numpy())
                     for i in range(len(data))])


def _ms(values: Sequence[float], digits: int = 3) -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return "n/a"
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def summary_table(scores: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Markdown: PSNR, SSIM and mean CCC per method and group, mean ± std over seeds."""
    lines = ["| group | method | PSNR (dB) ↑ | SSIM ↑ | mean CCC with the standard ↑ | features with CCC above no-op "
             "| mean CCC between protocols ↑ |", "|---|---|---|---|---|---|---|"]
    for group in GROUPS:
        base = scores["no-op"][group][0]["ccc"]  # the no-op is seed-free
        comparable = [f for f in FEATURE_NAMES if np.isfinite(base[f])]
        for label in METHODS:
            runs = scores[label][group]
            above = "—"
            if label != "no-op":
                wins = [sum(bool(r["ccc"][f] > base[f]) for f in comparable) for r in runs]
                above = f"{np.mean(wins):.1f} of {len(comparable)}"
            lines.append(f"| {group} | {label} | {_ms([r['psnr'] for r in runs], 2)} | "
                         f"{_ms([r['ssim'] for r in runs])} | {_ms([r['ccc_mean'] for r in runs])} | {above} | "
                         f"{_ms([r['between_mean'] for r in runs])} |")
    return "\n".join(lines)


def feature_table(scores: dict[str, dict[str, list[dict[str, Any]]]], group: str, kind: str = "ccc") -> str:
    """Markdown: every feature's CCC (``kind``: ``"ccc"`` with the standard, ``"between"`` protocols) per method
    (mean ± std over seeds) for one group."""
    lines = ["| feature | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for f in FEATURE_NAMES:
        lines.append(f"| `{f}` | " + " | ".join(_ms([r[kind][f] for r in scores[m][group]]) for m in METHODS)
                     + " |")
    return "\n".join(lines)


def verdicts(scores: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """The claim per group and method, decided from the per-seed mean CCC (paired with the no-op)."""
    lines = []
    for group in GROUPS:
        for key, what in (("ccc_mean", "CCC with the standard"), ("between_mean", "CCC between protocols")):
            base = scores["no-op"][group][0][key]
            for label in METHODS[1:]:
                gains = np.array([r[key] - base for r in scores[label][group]])
                wins = int((gains > 0).sum())
                verdict = ("supported" if wins == len(gains) else "not supported" if gains.mean() <= 0 else "mixed")
                lines.append(f"- standardization raises mean feature {what} — {label} vs no-op, {group}: "
                             f"**{verdict}** (change {gains.mean():+.3f} on average, higher in {wins} of "
                             f"{len(gains)} seeds)")
        two, uni = scores[METHODS[2]][group], scores[METHODS[1]][group]
        gains = np.array([a["ccc_mean"] - b["ccc_mean"] for a, b in zip(two, uni, strict=True)])
        lines.append(f"- two-stage vs direct U-Net, mean CCC, {group}: {gains.mean():+.3f} on average, higher in "
                     f"{int((gains > 0).sum())} of {len(gains)} seeds")
    return lines


def cost_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: CPU and wall minutes per run and in all, per method."""
    lines = ["| method | CPU min per run | wall min per run | CPU min, all seeds |", "|---|---|---|---|"]
    for label, runs in results.items():
        cpu, wall = [r["cpu_seconds"] / 60 for r in runs], [r["seconds"] / 60 for r in runs]
        lines.append(f"| {label} | {np.mean(cpu):.1f} | {np.mean(wall):.1f} | {np.sum(cpu):.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- figure


def figure(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, path: Path) -> None:
    """One held-out phantom under every test protocol: source, outputs, standard, and difference maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difffeat.data.ct import window

    data = test_set(args)
    k = len(data.protocols)
    standard = data[args.figure_phantom * k]["target_hu"][0].numpy()
    level, width = -300.0, 1400.0  # lung to soft tissue in one window
    cols = [("source (no-op)", "no-op"), ("direct U-Net", "direct U-Net"), ("two-stage", "two-stage (DiffusionCT)")]
    n_cols = len(cols) + 1 + len(cols)
    fig, axes = plt.subplots(k, n_cols, figsize=(1.6 * n_cols, 1.7 * k), squeeze=False)
    for r, protocol in enumerate(data.protocols):
        images = [np.asarray(results[m][0]["figure"][r], dtype=np.float32) for _, m in cols]
        panels = [(t, window(im, level, width), "gray", 0, 1) for (t, _), im in zip(cols, images, strict=True)]
        panels.append(("standard", window(standard, level, width), "gray", 0, 1))
        panels += [(f"|{t.split()[0]} − std| HU", np.abs(im - standard), "magma", 0, 200)
                   for (t, _), im in zip(cols, images, strict=True)]
        for c, (title, panel, cmap, lo, hi) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=6)
        axes[r, 0].set_ylabel(protocol.name, fontsize=6)
    fig.suptitle(f"held-out phantom {args.figure_phantom} ({data.kind(args.figure_phantom)}), seed "
                 f"{args.seeds[0]}; window L {level:.0f} / W {width:.0f} HU; differences 0–200 HU", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line settings (the defaults are the full study's; ``--smoke`` shrinks them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage1-steps", type=int, default=600)
    p.add_argument("--stage2-steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="slice side (train and test)")
    p.add_argument("--train-phantoms", type=int, default=64)
    p.add_argument("--test-phantoms", type=int, default=16, help="held-out phantoms (the real slice included)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the stage-2 config's)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--figure-phantom", type=int, default=1, help="test phantom shown in the figure")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny run: 32 px, 30 + 30 steps, 3 test phantoms, seed 0")
    args = p.parse_args(argv)
    if args.smoke:
        args.stage1_steps, args.stage2_steps, args.size = 30, 30, 32
        args.train_phantoms, args.test_phantoms, args.seeds, args.sample_steps = 6, 3, [0], 5
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs (or reuses) every (method, seed), writes the report and the figure; returns the scores."""
    args = parse_args(argv)
    command = "python -m experiments.ct_standardization " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    results = {label: [run_cached(label, seed, args) for seed in ([args.seeds[0]] if label == "no-op" else
                                                                    args.seeds)] for label in METHODS}
    data = test_set(args)
    held_out = len(data.protocols) - 1
    reference = reference_features(args)
    scores = {label: {g: [group_scores(r, reference, g, held_out) for r in runs] for g in GROUPS}
              for label, runs in results.items()}
    suffix = "_smoke" if args.smoke else ""
    args.out.mkdir(parents=True, exist_ok=True)
    figure(results, args, args.out / f"ct_standardization{suffix}.png")
    total = sum(r["cpu_seconds"] for runs in results.values() for r in runs) / 60
    protocols = ", ".join(f"{p.name} ({p.filter_name}, {p.photons:.0e} photons, blur {p.blur})"
                          for p in data.protocols)
    text = "\n".join([
        "# CT standardization on simulated scanners: no-op vs direct U-Net vs two-stage DiffusionCT"
        + (" (SMOKE RUN: tiny settings, not a result)" if args.smoke else ""), "",
        f"Rerun: `{command.strip()}` (cached per (method, seed) under `.cache/difffeat/ct_standardization/`).", "",
        f"Settings: {args.size}-px slices; training pairs from {args.train_phantoms} phantoms (training seed) under "
        f"the training protocols and the standard; stage 1 {args.stage1_steps} steps, stage 2 {args.stage2_steps} "
        f"steps, direct U-Net {args.stage1_steps + args.stage2_steps} steps, batch {args.batch_size}; seeds "
        f"{args.seeds} (no-op is seed-free: one run). Test: {args.test_phantoms} held-out phantoms (test seed, "
        f"the real slice CT_small.dcm first) under {protocols}; the last is the held-out protocol. PSNR / SSIM "
        f"against the standard scan on the clipped 2048-HU range; *CCC with the standard*: per feature, between "
        f"the method's outputs and the standard scans over the (phantom, protocol) pairs of each group; *CCC "
        f"between protocols*: per feature, between the outputs of the same phantoms under two protocols, "
        f"averaged over the protocol pairs (seen: every pair of seen protocols; held-out: the held-out one "
        f"against each seen one); mean ± sample std over seeds. "
        f"CPU minutes in all: {total:.1f}.", "",
        "## Summary", "", summary_table(scores), "",
        "## Verdicts (computed from the per-seed numbers)", "", *verdicts(scores), "",
        "## Per-feature CCC with the standard, seen protocols", "", feature_table(scores, GROUPS[0]), "",
        "## Per-feature CCC with the standard, held-out protocol", "", feature_table(scores, GROUPS[1]), "",
        "## Per-feature CCC between protocols, seen protocols", "", feature_table(scores, GROUPS[0], "between"), "",
        "## Per-feature CCC between protocols, held-out protocol", "", feature_table(scores, GROUPS[1], "between"),
        "",
        "## Cost", "", cost_table(results), "",
        f"![examples](ct_standardization{suffix}.png)", ""])
    atomic_write(args.out / f"ct_standardization{suffix}.md", text.encode())
    if not args.smoke and args.out == RESULTS:
        from experiments.probe_digits import write_readme_table

        write_readme_table(summary_table(scores), marker="ct")
    print(text)
    return scores


if __name__ == "__main__":
    main()
