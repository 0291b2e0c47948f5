"""Acceptance of detection-data synthesis (DiffusionEngine's claim): synthetic data lifts mAP when real labels are few.

On generated scenes (64 px, fold 0's five classes) with few labelled images:

1. the labelled real scenes (``--real``, default 50) and a held-out real test set (``--test``, default 200,
   another seed) are exported as COCO folders;
2. the detection adapter (``configs/detection_adapter.yaml``'s model, on the diffusion-pretrained scene
   U-Net that ``configs/ddpm_scenes.yaml`` trains) is fitted on the real scenes; its own mAP on the test set
   is reported (its boxes label the synthetic images);
3. ``--synth`` images (default 500) are synthesized in one pass each from the real scenes
   (:func:`difffeat.synthesize.synthesize`, strength in [0.4, 0.8], boxes above 0.3), optionally a second
   time with a feature cache (``--cache CLASS --cache-kwargs JSON``) to measure its images/s and the mAP
   change it causes;
4. detectors are trained from scratch with equal steps on real only, real + synthesized and synthesized
   only, ``--seeds`` seeds each: torchvision FCOS (:mod:`heads.detectors`, torchmetrics' COCO mAP; the
   same predictions are also scored by mmdet's ``CocoMetric``) and mmdet's FCOS
   (``configs/mmdet/fcos_r18_difffeat.py``, mmdet's runner and ``CocoMetric``);
5. the table (mAP@[.5:.95], mAP@.5, mean ± std over seeds and per seed), the verdict computed from it,
   the timings, and a figure of synthesized images with their boxes are written to ``experiments/results/``.

Every finished unit (adapter, dataset, detector run) is kept under ``--work-dir``, so a stopped run resumes.

    python -m experiments.detection_synthesis            # the full run
    python -m experiments.detection_synthesis --smoke    # minutes: tiny sizes, a random U-Net if none is trained
    python -m experiments.detection_synthesis --cache difffeat.cache.DeepCache \
        --cache-kwargs '{"interval": 3, "last_full": true, "steps": 25}'   # plus the cached-synthesis rows
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from difffeat.data.coco import CocoDetection, export_scenes, load_coco
from difffeat.store import atomic_write

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "experiments" / "results"
PRETRAINED = ".cache/difffeat/backbones/sd-unet-scenes-ddpm"
CONDITIONS = ("real", "real+synth", "synth")
#: the label control: synthesized images with their seed scene's ground-truth boxes instead of the adapter's
SEED_BOXES = "real+synth, seed scenes' boxes (label control)"
#: --frameworks name -> the report's row label
FRAMEWORKS = {"torchvision": "torchvision FCOS (torchmetrics)", "mmdet": "mmdet FCOS (CocoMetric)"}


def _json_cached(path: Path, compute: Any) -> dict[str, Any]:
    """``compute()`` once: its result is kept in ``path`` (written atomically) and read back on reruns."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result, indent=1).encode())
    return result


def _claim_work_dir(work: Path, settings: dict[str, Any]) -> None:
    """Ties ``work`` to these settings: its kept units (adapter, datasets, runs) are reused only by the same ones."""
    path = work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            raise SystemExit(f"{work} holds units made with other settings ({', '.join(differ)}: "
                             f"{ {k: old.get(k) for k in differ} } there); pass another --work-dir")
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(settings, indent=1).encode())


def _adapter_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / "detection_adapter.yaml").read_text())["model"]["init_args"]


def _adapter(args: argparse.Namespace, backbone: str, real: Path, work: Path, head: str
             ) -> tuple[Any, dict[str, Any]]:
    """The adapter of configs/detection_adapter.yaml with ``head`` on ``backbone``, fitted on ``real`` (kept)."""
    from safetensors.torch import load_file, save_file

    from heads.detection import DetectionAdapter, fit_adapter
    from heads.detectors import evaluate_map

    init = _adapter_config()
    init["backbone"], init["head"] = backbone, head
    train = CocoDetection(real)
    if init["categories"] != train.categories:
        raise ValueError(f"the adapter config's categories {init['categories']} differ from {real}'s "
                         f"{train.categories}")
    torch.manual_seed(args.seed)
    adapter = DetectionAdapter(**init).to(args.device)
    weights = work / f"adapter-{head}" / "head.safetensors"
    info_path = work / f"adapter-{head}" / "info.json"
    if weights.is_file() and info_path.is_file():
        adapter.head.load_state_dict(load_file(weights))
        adapter.eval()
        return adapter, json.loads(info_path.read_text())
    start = time.perf_counter()
    losses = fit_adapter(adapter, train, args.adapter_steps, batch_size=8, seed=args.seed)
    seconds = time.perf_counter() - start
    test = CocoDetection(work / "test")
    preds = []
    for i in range(0, len(test), 16):
        images = torch.stack([test[j]["image"] for j in range(i, min(i + 16, len(test)))])
        preds += [{k: v.cpu() for k, v in p.items()} for p in adapter.predict(images, score_threshold=0.0)]
    adapter._features = {}  # test features are not needed again
    scores = evaluate_map(preds, test)
    info = {"head": head, "steps": args.adapter_steps, "seconds": seconds,
            "first_loss": float(np.mean(losses[:20])),
            "last_loss": float(np.mean(losses[-20:])), "test_map": scores["map"], "test_map_50": scores["map_50"],
            "backbone": backbone}
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.head.state_dict().items()}, str(weights))
    atomic_write(info_path, json.dumps(info, indent=1).encode())
    return adapter, info


def _seed_box_control(work: Path) -> Path:
    """``work/synth_seedboxes``: the synthesized images labelled with their *seed* scene's ground-truth boxes.

    The label control: the same images as ``synth`` (``images`` links to them), but boxes copied from the real
    scene each image was synthesized from instead of the adapter's. If it lifts mAP where the adapter's boxes do
    not, the adapter's labels, not the images, are what holds synthesis back. (At strength 0.4-0.8 objects keep
    their places, mostly: the copied boxes are themselves an approximation, stated in the report.)
    """
    from difffeat.data.coco import write_coco

    out = work / "synth_seedboxes"
    if (out / "annotations.json").is_file():
        return out
    synth, real = load_coco(work / "synth"), load_coco(work / "real")
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for a in real["annotations"]:
        by_seed.setdefault(a["image_id"], []).append(a)
    annotations = []
    for im in synth["images"]:
        for a in by_seed.get(im["seed_image_id"], []):
            annotations.append({**a, "id": len(annotations) + 1, "image_id": im["id"]})
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists():
        (out / "images").symlink_to(Path("..") / "synth" / "images")
    write_coco(out / "annotations.json", {**synth, "annotations": annotations}, out / "images")
    return out


def _make_cache(args: argparse.Namespace) -> Any:
    if not args.cache:
        return None
    module, _, name = args.cache.rpartition(".")
    return getattr(importlib.import_module(module), name)(**json.loads(args.cache_kwargs))


def _torchvision_run(train_roots: list[Path], test_root: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from experiments.mmdet_train import coco_metric
    from heads.detectors import build_detector, coco_datasets, detect, evaluate_map, train_detector

    data, categories = coco_datasets(train_roots)
    model = build_detector("fcos", len(categories), 64, seed=seed)
    start = time.perf_counter()
    losses = train_detector(model, data, steps=args.detector_steps, batch_size=8, seed=seed, device=args.device)
    seconds = time.perf_counter() - start
    test = CocoDetection(test_root)
    preds = detect(model, test, device=args.device)
    result = {"seconds": seconds, "last_loss": float(np.mean(losses[-20:])), **evaluate_map(preds, test)}
    try:
        mm = coco_metric(test_root, preds)
        result.update(mmdet_metric_map=mm["map"], mmdet_metric_map_50=mm["map_50"])
    except ImportError as err:
        result["mmdet_metric"] = f"not run: {err}"
    return result


def _mmdet_run(train_roots: list[Path], test_root: Path, seed: int, work: Path, args: argparse.Namespace
               ) -> dict[str, Any]:
    from experiments.mmdet_train import train_and_test

    start = time.perf_counter()
    result = train_and_test(train_roots, test_root, work, iters=args.detector_steps, batch_size=8, seed=seed)
    return {"seconds": time.perf_counter() - start, **result}


def _mmdet_available() -> str | None:
    try:
        import mmdet  # noqa: F401
        from mmcv.ops import nms  # noqa: F401
    except Exception as err:
        return f"mmdet cannot be imported ({type(err).__name__}: {err})"
    return None


def _figure(synth: Path, real: Path, path: Path, n: int = 8) -> None:
    """Synthesized images with the adapter's boxes (bottom row) under the real seed scene each came from, with
    its ground-truth boxes (top row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    data, seeds = load_coco(synth), load_coco(real)
    names = {c["id"]: c["name"] for c in data["categories"]}
    seed_images = {im["id"]: im for im in seeds["images"]}
    images = data["images"][:n]
    fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.8), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for col, im in enumerate(images):
        seed = seed_images[im["seed_image_id"]]
        for row, (folder, shown, anns, colour) in enumerate((
                (real, seed, seeds["annotations"], "white"), (synth, im, data["annotations"], "yellow"))):
            ax = axes[row, col]
            with Image.open(folder / "images" / shown["file_name"]) as img:
                ax.imshow(img.convert("RGB"))
            for a in (a for a in anns if a["image_id"] == shown["id"]):
                x, y, w, h = a["bbox"]
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, color=colour, lw=1))
                label = names[a["category_id"]] + (f" {a['score']:.2f}" if "score" in a else "")
                ax.text(x, y - 1, label, color=colour, fontsize=6)
        axes[0, col].set_title(f"seed scene {seed['id']}", fontsize=7)
        axes[1, col].set_title(f"synthesized, strength {im['strength']:.2f}", fontsize=7)
    axes[0, 0].set_ylabel("real seed + ground truth", fontsize=7)
    axes[1, 0].set_ylabel("synthesized + adapter boxes", fontsize=7)
    fig.suptitle("synthesized scenes (bottom) and the adapter's boxes above the score threshold, under their real "
                 "seed scenes with ground-truth boxes (top)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _stats(rows: list[dict[str, Any]], key: str) -> tuple[float, float, list[float]]:
    vals = [100 * r[key] for r in rows if isinstance(r.get(key), float)]
    if not vals:
        return math.nan, math.nan, []
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, vals


def _report(args: argparse.Namespace, runs: dict[str, dict[str, list[dict[str, Any]]]], adapters: dict[str, dict],
            synth_info: dict, cache_info: dict | None, mmdet_reason: str | None, figure: Path, out: Path,
            seconds: float) -> str:
    names = [c["name"] for c in load_coco(Path(args.work_dir) / "real")["categories"]]
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "experiments.detection_synthesis", *args.argv])
    lines = [f"# Detection-data synthesis{' (smoke run: sizes too small to mean anything)' if args.smoke else ''}",
             "", f"Command: `{command}`", "",
             f"Real labelled scenes {args.real}, synthesized {args.synth}, held-out real test scenes {args.test} "
             f"(64 px, classes {names}); detectors trained from scratch"
             f" for {args.detector_steps} steps of 8 images on every condition; seeds "
             f"{list(range(args.seeds))}. Backbone: `{adapters[args.head]['backbone']}`.", "",
             "Detection adapters, both heads trained on the same real scenes for the same steps and scored on the "
             "held-out real test set; the synthesis below uses the "
             f"**{args.head}** head (`--head`):", "",
             "| adapter head | steps | seconds | loss first → last 20 steps | mAP@[.5:.95] | mAP@.5 |",
             "|---|---|---|---|---|---|",
             *(f"| {h} | {a['steps']} | {a['seconds']:.0f} | {a['first_loss']:.3f} → {a['last_loss']:.3f} | "
               f"{100 * a['test_map']:.2f} | {100 * a['test_map_50']:.2f} |" for h, a in adapters.items()), "",
             f"Synthesis: {synth_info['images']} images, {synth_info['boxes']} boxes "
             f"({synth_info['boxes'] / synth_info['images']:.2f} per image; the real scenes have "
             f"{len(load_coco(Path(args.work_dir) / 'real')['annotations']) / args.real:.2f}), "
             f"{synth_info['images_per_s']:.3f} images/s ({args.steps} full-strength DDIM steps)."]
    if cache_info is not None:
        lines += ["", f"With the feature cache `{args.cache}` {args.cache_kwargs}: {cache_info['images_per_s']:.3f} "
                  f"images/s ({cache_info['images_per_s'] / synth_info['images_per_s']:.2f}× the uncached rate; "
                  f"the two runs are not paired in time or load: experiments/bench_synthesis.py measures the "
                  f"speed-up properly)."]
    table = _map_table(runs)
    lines += ["", *table]
    if mmdet_reason:
        lines += ["", f"mmdet rows not run: {mmdet_reason}."]
    tv = runs.get("torchvision FCOS (torchmetrics)", {})
    gaps = [abs(100 * (r["map"] - r["mmdet_metric_map"])) for rows in tv.values() for r in rows
            if "mmdet_metric_map" in r]
    if gaps:
        lines += ["", f"The torchvision detectors' predictions scored by mmdet's CocoMetric: largest mAP difference "
                  f"to torchmetrics {max(gaps):.3f} points over {len(gaps)} runs."]
    lines += ["", "## Verdict", ""]
    for framework, by_condition in runs.items():
        real, mixed = by_condition.get("real", []), by_condition.get("real+synth", [])
        if not real or not mixed:
            continue
        diffs = [100 * (b["map"] - a["map"]) for a, b in zip(real, mixed, strict=False)]
        mean = float(np.mean(diffs))
        lifted = all(d > 0 for d in diffs)
        word = "lifts" if lifted else ("does not consistently lift" if mean > 0 else "does not lift")
        lines.append(f"- {framework}: real + synthesized vs real only, mAP {mean:+.2f} points on average "
                     f"(per seed {', '.join(f'{d:+.2f}' for d in diffs)}): synthetic data {word} mAP here.")
        control = by_condition.get(SEED_BOXES, [])
        if control:
            d = [100 * (b["map"] - a["map"]) for a, b in zip(real, control, strict=False)]
            lines.append(f"- {framework}: label control (the same synthesized images with their seed scenes' boxes) "
                         f"vs real only, mAP {np.mean(d):+.2f} points (per seed {', '.join(f'{v:+.2f}' for v in d)}).")
        cached = by_condition.get("real+synth (cached synthesis)", [])
        if cached:
            d = [100 * (b["map"] - a["map"]) for a, b in zip(mixed, cached, strict=False)]
            lines.append(f"- {framework}: the feature cache changes the real + synthesized mAP by {np.mean(d):+.2f} "
                         f"points (per seed {', '.join(f'{v:+.2f}' for v in d)}).")
    lines += ["", f"![synthesized images]({figure.name})", "", f"Wall time of this invocation (kept units are reused) "
              f"{seconds / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    atomic_write(out, text.encode())
    if out == RESULTS / "detection_synthesis.md":  # the reported study also fills the README's table
        from experiments.probe_digits import write_readme_table

        adapter_line = ", ".join(f"{h} head {100 * a['test_map']:.1f}" for h, a in adapters.items())
        write_readme_table("\n".join([*table, "", f"Adapter's own mAP on the test scenes: {adapter_line}; the "
                                      f"synthesis is labelled by the {args.head} head. `{command}`"]),
                           marker="detection")
    return text


def _map_table(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Markdown rows: mAP@[.5:.95] and mAP@.5 (mean ± std over seeds, per seed) per framework and training data."""
    lines = ["| detector (metric) | training data | mAP@[.5:.95] | mAP@.5 | per seed mAP | time / run |",
             "|---|---|---|---|---|---|"]
    for framework, by_condition in runs.items():
        for condition, rows in by_condition.items():
            m, s, vals = _stats(rows, "map")
            m50, s50, _ = _stats(rows, "map_50")
            secs = np.mean([r["seconds"] for r in rows]) if rows else math.nan
            lines.append(f"| {framework} | {condition} | {m:.2f} ± {s:.2f} | {m50:.2f} ± {s50:.2f} | "
                         f"{', '.join(f'{v:.2f}' for v in vals)} | {secs:.0f} s |")
    return lines


def main(argv: list[str] | None = None) -> str:
    """Runs the acceptance experiment; returns the report's markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, minutes on a CPU")
    parser.add_argument("--backbone", default=None, help=f"diffusion model (default {PRETRAINED})")
    parser.add_argument("--real", type=int, default=50)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--synth", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of a full-strength pass")
    parser.add_argument("--adapter-steps", type=int, default=1500)
    parser.add_argument("--detector-steps", type=int, default=1000)
    parser.add_argument("--head", default=None, choices=["set", "dense"],
                        help="adapter head that labels the synthesis (default: the config's); the other head is "
                             "trained too, for the comparison row")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="feature cache class path (e.g. difffeat.cache.X)")
    parser.add_argument("--cache-kwargs", default="{}", help="its constructor arguments as JSON")
    parser.add_argument("--device", default="cpu", help="where the adapter, synthesis and torchvision detectors run")
    parser.add_argument("--no-mmdet", action="store_true", help="skip the mmdet rows")
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS),
                        help="which detectors' runs this invocation trains (kept runs of the others are still "
                             "reported): two processes, one per framework, share a machine's cores; a last "
                             "invocation with both writes the whole table from the kept runs")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default=None, help="report path (default experiments/results/...)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.real, args.test, args.synth, args.seeds = min(args.real, 16), min(args.test, 16), min(args.synth, 8), 1
        args.steps, args.adapter_steps, args.detector_steps = min(args.steps, 10), 30, 15
    name = "detection_synthesis_smoke" if args.smoke else "detection_synthesis"
    args.work_dir = args.work_dir or str(ROOT / ".cache" / "difffeat" / name)
    work = Path(args.work_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = args.backbone or PRETRAINED
    if not Path(ROOT / backbone).is_dir() and not Path(backbone).is_dir():
        if not args.smoke and args.backbone is None:
            raise SystemExit(f"{PRETRAINED} is missing: train it first (difffeat fit --config configs/ddpm_scenes.yaml)"
                             f", or pass --backbone")
        backbone = args.backbone or "sd-unet-scenes"  # smoke: a random-init U-Net of the same architecture
    elif Path(ROOT / backbone).is_dir():
        backbone = str(ROOT / backbone)
    start = time.perf_counter()
    args.head = args.head or _adapter_config().get("head", "set")
    _claim_work_dir(work, {**{k: getattr(args, k) for k in ("real", "test", "synth", "steps", "adapter_steps",
                                                            "detector_steps", "score_threshold", "seed",
                                                            "head")},
                           "backbone": backbone})
    classes = [0, 1, 2, 3, 4]
    for split, n, seed, offset in (("real", args.real, args.seed, 0), ("test", args.test, args.seed + 1000, 0)):
        if not (work / split / "annotations.json").is_file():
            export_scenes(work / split, n, size=64, seed=seed, classes=classes, offset=offset, overwrite=True)
    adapters = {}
    for head in [*sorted({"set", "dense"} - {args.head}), args.head]:  # the synthesizing one last, kept in memory
        adapter, adapters[head] = _adapter(args, backbone, work / "real", work, head)
    from difffeat.synthesize import synthesize

    synth_info = _json_cached(work / "synth_info.json", lambda: synthesize(
        adapter, work / "real", work / "synth", args.synth, steps=args.steps, score_threshold=args.score_threshold,
        seed=args.seed))
    cache_info = None
    cache = _make_cache(args)
    if cache is not None:
        tag = hashlib.sha256(f"{args.cache}:{json.dumps(json.loads(args.cache_kwargs), sort_keys=True)}".encode()
                             ).hexdigest()[:10]
        cached_dir = work / f"synth_cached_{tag}"
        cache_info = _json_cached(work / f"synth_cached_{tag}_info.json", lambda: synthesize(
            adapter, work / "real", cached_dir, args.synth, steps=args.steps,
            score_threshold=args.score_threshold, seed=args.seed, cache=cache))
    mmdet_reason = "skipped by --no-mmdet" if args.no_mmdet else _mmdet_available()
    data = {"real": [work / "real"], "real+synth": [work / "real", work / "synth"], "synth": [work / "synth"],
            SEED_BOXES: [work / "real", _seed_box_control(work)]}
    if cache_info is not None:
        data["real+synth (cached synthesis)"] = [work / "real", cached_dir]
    frameworks = ["torchvision"] + (["mmdet"] if mmdet_reason is None else [])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {FRAMEWORKS[f]: {} for f in frameworks}
    for condition, roots in data.items():
        key = re.sub(r"\W+", "_", condition).strip("_")  # a file name: letters, digits and single underscores
        if cache_info is not None and "cached" in condition:
            key += f"_{tag}"
        for seed in range(args.seeds):
            train = {"torchvision": lambda r=roots, s=seed: _torchvision_run(r, work / "test", s, args),
                     "mmdet": lambda r=roots, s=seed, k=key: _mmdet_run(r, work / "test", s,
                                                                         work / "mmdet" / f"{k}_{s}", args)}
            for framework in frameworks:
                path = work / "runs" / f"{framework}_{key}_{seed}.json"
                if framework in args.frameworks or path.is_file():
                    runs[FRAMEWORKS[framework]].setdefault(condition, []).append(_json_cached(path, train[framework]))
    out = Path(args.out) if args.out else (work / f"{name}.md" if args.smoke else RESULTS / f"{name}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = out.with_name(f"{out.stem}_examples.png")
    _figure(work / "synth", work / "real", figure)
    text = _report(args, runs, adapters, synth_info, cache_info, mmdet_reason, figure, out,
                   time.perf_counter() - start)
    print(text)
    return text


if __name__ == "__main__":
    main()
