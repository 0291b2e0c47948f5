"""Few-shot semantic segmentation on the scene benchmark: the episodic protocol, 4 folds, novel classes.

Arms, all evaluated on the same seeded test episodes (fold ``f``'s five novel classes, scenes of another
seed than any training scene):

* ``prototype · digits U-Net, DDPM-trained``: the PANet-style baseline on the main job's digits U-Net
  (grey-scale, trained on 16 px digits; the scenes' luminance is fed at 64 px);
* ``prototype · digits U-Net, untrained``: the same architecture at random init;
* ``prototype · scenes U-Net, DDPM-trained`` / ``untrained``: the baseline on the pixel-space SD-shaped
  U-Net (``sd-unet-scenes``) after :file:`configs/ddpm_scenes.yaml` (unlabelled scenes of every class,
  another seed than the test scenes) and at random init;
* ``DiffewS · from the DDPM-trained scenes U-Net``: fine-tuned per fold on 1-shot episodes of the base
  classes, evaluated 1-shot and 5-shot;
* ``DiffewS · from random init``: the same training from the untrained U-Net (what pretraining buys).

Prototype taps are chosen per fold and per backbone on 1-shot episodes of the fold's *base* classes
(training scenes), among every block output at t ∈ {10, 50, 200}; novel classes are never used to
choose anything. DiffewS trains for a fixed number of steps, with no early stopping.

5-shot is reported both natively (prototypes averaged over shots; DiffewS's K/V bank holds all five
supports) and by per-shot vote (:func:`heads.fewshot.shot_vote`).

Rerun: ``python -m experiments.fewshot_benchmark`` (writes ``experiments/results/fewshot_benchmark.md``
and ``fewshot_benchmark_examples.png``; finished arms are cached under ``.cache/difffeat/fewshot`` and reused by a
rerun with the same settings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader
from tqdm import tqdm

from difffeat.backbones import create_backbone
from difffeat.data.episodes import FewShotDataModule, FewShotEpisodes
from difffeat.data.scenes import CLASSES, SceneDataset, fold_classes
from difffeat.extract import FeatureExtractor
from difffeat.readout import PerPixel
from difffeat.store import atomic_write
from experiments.probe_digits import ROOT, ensure_backbone, write_readme_table
from heads.fewshot import FeatureCache, FewShotIoU, Predictor, dense_features, episode_masks
from heads.fewshot_diffews import DiffewS, DiffewSModule
from heads.fewshot_prototype import PrototypeSegmenter

RESULTS = ROOT / "experiments" / "results"
CACHE = ROOT / ".cache" / "difffeat" / "fewshot"
#: evaluation settings: (name, shots, vote)
SETTINGS = (("1-shot", 1, False), ("5-shot", 5, False), ("5-shot vote", 5, True))
CONTROL = "1-shot, another episode's support"
#: bumped when a runner's output changes, so that cached (arm, fold) results are recomputed
VERSIONS = {"prototype_arm": 2, "diffews_arm": 3}
CANDIDATE_T = (10, 50, 200)
SIZE = 64
EXAMPLES = 4  # fold-0 1-shot episodes drawn in the figure


def block_outputs(backbone: Any) -> list[str]:
    """The candidate prototype taps: every block's output (``down_blocks.i``, ``mid_block``, ``up_blocks.i``)."""
    return [n for n in backbone.feature_info if n == "mid_block" or (n.count(".") == 1 and "blocks." in n)]


def evaluate(predict: Predictor, episodes: FewShotEpisodes, vote: bool, desc: str, keep: int = 0,
             foreign_support: bool = False) -> tuple[dict[str, float], list[np.ndarray]]:
    """mIoU and FB-IoU (%) of ``predict`` over ``episodes``, and the first ``keep`` predicted masks.

    With ``foreign_support`` (a control), each query gets the supports of the previous episode in its
    batch (mostly of another class) while it is scored against its own class: a model that segments
    what the support shows scores much lower; one that ignores the support scores the same.
    """
    metric, kept = FewShotIoU(len(CLASSES)), []
    with torch.no_grad():
        for batch in tqdm(DataLoader(episodes, batch_size=8), desc=desc, leave=False):
            support, support_mask = batch["support"], batch["support_mask"]
            if foreign_support:
                support, support_mask = support.roll(1, 0), support_mask.roll(1, 0)
            masks = episode_masks(predict, support, support_mask, batch["query"], vote)
            metric.update(masks, batch["query_mask"], batch["class_id"], batch["query_ignore"])
            kept += [m.numpy() for m in masks[: keep - len(kept)]]
    scores = metric.compute()
    return {"miou": 100 * float(scores["miou"]), "fbiou": 100 * float(scores["fbiou"])}, kept


def test_episodes(fold: int, shots: int, n: int) -> FewShotEpisodes:
    """The benchmark's test episodes of a fold (the datamodule's, so configs and this script agree)."""
    return FewShotDataModule(fold=fold, shots=shots, size=SIZE, test_episodes=n)._episodes(train=False)


def evaluate_settings(predict: Predictor, fold: int, episodes: int) -> dict[str, Any]:
    """Scores of every setting of :data:`SETTINGS` on a fold's test episodes, plus (fold 0) the masks of
    the first one-shot episodes for the figure."""
    out: dict[str, Any] = {}
    for name, shots, vote in SETTINGS:
        keep = EXAMPLES if (fold, name) == (0, "1-shot") else 0
        out[name], examples = evaluate(predict, test_episodes(fold, shots, episodes), vote, f"fold {fold} {name}", keep)
        if examples:
            out["examples"] = [e.tolist() for e in examples]
    return out


def prototype_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Chooses a tap on base-class episodes, then evaluates the prototype baseline on the novel ones."""
    model = create_backbone(backbone)
    base = [c for c in range(len(CLASSES)) if c not in fold_classes(fold)]
    val = FewShotEpisodes(SceneDataset(args.val_scenes, SIZE, 0, classes=base), base, 1, args.val_episodes, seed=0)
    layers = block_outputs(model)
    extractor = FeatureExtractor(model, layers, CANDIDATE_T, readout=PerPixel(args.feature_size), noise="content")
    cache = FeatureCache(dense_features(extractor))
    offsets, start = {}, 0
    for layer in layers:  # concat_features order: layer-major, then timestep
        for t in CANDIDATE_T:
            width = model.feature_info[layer].channels
            offsets[(layer, t)] = slice(start, start + width)
            start += width
    val_miou = {}
    for key, cols in offsets.items():
        segmenter = PrototypeSegmenter(lambda x, cols=cols: cache(x)[:, cols])
        val_miou[key] = evaluate(segmenter.predict, val, False, f"select {key}")[0]["miou"]
    layer, t = max(val_miou, key=val_miou.get)
    cache.store.clear()  # the candidates' features are no longer needed
    extractor = FeatureExtractor(model, [layer], [t], readout=PerPixel(args.feature_size), noise="content")
    segmenter = PrototypeSegmenter(FeatureCache(dense_features(extractor)))
    return {"tap": f"{layer}@t{t}", "val_miou": val_miou[(layer, t)],
            **evaluate_settings(segmenter.predict, fold, args.episodes)}


def diffews_arm(backbone: str, fold: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Fine-tunes DiffewS on 1-shot base-class episodes of a fold, then evaluates it on the novel ones;
    its weights are kept in ``{CACHE}/{tag}.safetensors``."""
    L.seed_everything(0, verbose=False)
    module = DiffewSModule(backbone=backbone, lr=args.lr)
    data = FewShotDataModule(fold=fold, shots=1, size=SIZE, train_scenes=args.train_scenes,
                             train_episodes=args.train_steps * args.batch_size, batch_size=args.batch_size)
    trainer = L.Trainer(accelerator="cpu", max_steps=args.train_steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    model = module.model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    atomic_write(CACHE / f"{tag}.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    control = evaluate(model.predict, test_episodes(fold, 1, args.episodes), False, f"fold {fold} control",
                       foreign_support=True)[0]
    return {"train_steps": args.train_steps, CONTROL: control, **evaluate_settings(model.predict, fold, args.episodes)}


def arms(args: argparse.Namespace) -> dict[str, tuple[Callable[..., dict[str, Any]], str]]:
    """Arm label → (runner, backbone), in the order they run (cheap ones first)."""
    digits = args.digits_backbone or str(ensure_backbone())
    scenes = args.scenes_backbone or str(ensure_backbone(ROOT / "configs" / "ddpm_scenes.yaml"))
    table = {
        "prototype · digits U-Net, DDPM-trained": (prototype_arm, digits),
        "prototype · digits U-Net, untrained": (prototype_arm, "unet2d-digits"),
        "prototype · scenes U-Net, DDPM-trained": (prototype_arm, scenes),
        "prototype · scenes U-Net, untrained": (prototype_arm, "sd-unet-scenes"),
        "DiffewS · from the DDPM-trained scenes U-Net": (diffews_arm, scenes),
        "DiffewS · from random init": (diffews_arm, "sd-unet-scenes"),
    }
    return {k: v for k, v in table.items() if not args.arms or any(a in k for a in args.arms)}


def _stamp(backbone: str) -> str:
    stamp = Path(backbone) / "difffeat-config.sha256"
    return stamp.read_text() if stamp.exists() else backbone


def run_cached(label: str, runner: Callable[..., dict[str, Any]], backbone: str, fold: int,
               args: argparse.Namespace) -> dict[str, Any]:
    """One (arm, fold), reused from the cache when run before with the same settings and backbone."""
    settings = {k: v for k, v in vars(args).items() if k not in ("arms", "folds", "out")}
    version = VERSIONS[runner.__name__]
    key = hashlib.sha256(json.dumps([label, _stamp(backbone), fold, settings] + ([version] if version > 1 else []),
                                    sort_keys=True).encode()).hexdigest()
    path = CACHE / f"{key[:16]}.json"
    if not path.exists():
        start = time.perf_counter()
        result = runner(backbone, fold, args, key[:16])
        result["seconds"] = time.perf_counter() - start
        CACHE.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(result).encode())
    return {**json.loads(path.read_text()), "tag": key[:16]}


def support_influence(backbone: str, weights: Path, fold: int, episodes: int = 64) -> dict[str, float]:
    """How much a trained DiffewS's mask logits depend on its support, on 1-shot test episodes.

    Returns the mean absolute change of the query's logits, as a percentage of their standard deviation,
    when the support is swapped for another episode's (``other``) and when the K/V bank is left empty
    (``none``: plain self-attention, no support at all).
    """
    model = DiffewS(backbone)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    batch = next(iter(DataLoader(test_episodes(fold, 1, episodes), batch_size=episodes)))
    support, masks, query = batch["support"], batch["support_mask"], batch["query"]
    with torch.no_grad():
        own = model(support, masks, query)
        other = model(support.roll(1, 0), masks.roll(1, 0), query)
        none = model.backbone(query, torch.full((len(query),), model.timestep))[:, 0]
    scale = own.std()
    return {"other": float(100 * (own - other).abs().mean() / scale),
            "none": float(100 * (own - none).abs().mean() / scale)}


def table(results: dict[str, dict[int, dict[str, Any]]], folds: list[int]) -> str:
    """Markdown: mIoU per fold and mean, FB-IoU mean, per arm and setting."""
    head = "| method | setting | " + " | ".join(f"fold {f}" for f in folds) + " | mean mIoU | mean FB-IoU |"
    lines = [head, "|" + "---|" * (len(folds) + 4)]
    for label, per_fold in results.items():
        for name, _, _ in SETTINGS:
            miou = [per_fold[f][name]["miou"] for f in folds]
            fb = [per_fold[f][name]["fbiou"] for f in folds]
            cells = " | ".join(f"{m:.1f}" for m in miou)
            lines.append(f"| {label} | {name} | {cells} | **{np.mean(miou):.1f}** | {np.mean(fb):.1f} |")
    return "\n".join(lines)


def control_table(results: dict[str, dict[int, dict[str, Any]]], folds: list[int]) -> str:
    """Markdown: 1-shot mIoU with the episode's own support vs another episode's, and the logit changes of
    :func:`support_influence`, per trained arm (means over folds)."""
    lines = ["| method | mIoU, own support | mIoU, another episode's support | Δ logits, another support "
             "(% of logit std) | Δ logits, empty K/V bank (% of logit std) |", "|---|---|---|---|---|"]
    for label, per_fold in results.items():
        if CONTROL in per_fold[folds[0]]:
            own = np.mean([per_fold[f]["1-shot"]["miou"] for f in folds])
            other = np.mean([per_fold[f][CONTROL]["miou"] for f in folds])
            d_other = np.mean([per_fold[f]["influence"]["other"] for f in folds])
            d_none = np.mean([per_fold[f]["influence"]["none"] for f in folds])
            lines.append(f"| {label} | {own:.1f} | {other:.1f} | {d_other:.2f} | {d_none:.2f} |")
    return "\n".join(lines)


def summary(results: dict[str, dict[int, dict[str, Any]]], folds: list[int]) -> str:
    """Markdown: mean mIoU over folds per arm (rows) and setting (columns)."""
    lines = ["| method | " + " | ".join(n for n, _, _ in SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for label, per_fold in results.items():
        cells = " | ".join(f"{np.mean([per_fold[f][n]['miou'] for f in folds]):.1f}" for n, _, _ in SETTINGS)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def figure(results: dict[str, dict[int, dict[str, Any]]], path: Path, n: int) -> None:
    """Fold-0 1-shot episodes: support with its mask, query, ground truth, and each arm's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = test_episodes(0, 1, n)
    labels = [k for k, v in results.items() if 0 in v and "examples" in v[0]]
    cols = 4 + len(labels)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 2.0 * n), squeeze=False)
    for e in range(n):
        item = episodes[e]
        panels = [((item["support"][0].permute(1, 2, 0) + 1) / 2, "support"),
                  (item["support_mask"][0], "support mask"), ((item["query"].permute(1, 2, 0) + 1) / 2, "query"),
                  (item["query_mask"], "query ground truth")]
        panels += [(torch.tensor(results[k][0]["examples"][e]), k.replace(" · ", "\n")) for k in labels]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--episodes", type=int, default=300, help="test episodes per fold and setting")
    parser.add_argument("--val-episodes", type=int, default=100, help="base-class episodes choosing the tap")
    parser.add_argument("--val-scenes", type=int, default=400)
    parser.add_argument("--feature-size", type=int, default=32, help="side of the prototype features")
    parser.add_argument("--train-steps", type=int, default=500, help="DiffewS steps per fold")
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8, help="DiffewS episodes per step")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--arms", nargs="*", default=None, help="run only arms whose label holds one of these")
    parser.add_argument("--digits-backbone", help="trained digits U-Net folder (default: train or reuse "
                        "configs/ddpm_digits.yaml's)")
    parser.add_argument("--scenes-backbone", help="trained scenes U-Net folder (default: train or reuse "
                        "configs/ddpm_scenes.yaml's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fewshot_benchmark.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for label, (runner, backbone) in arms(args).items():
        results[label] = {}
        for fold in args.folds:
            print(f"== {label}, fold {fold}")
            results[label][fold] = run_cached(label, runner, backbone, fold, args)
            if runner is diffews_arm:
                weights = CACHE / f"{results[label][fold]['tag']}.safetensors"
                results[label][fold]["influence"] = support_influence(backbone, weights, fold)
            print(json.dumps({k: v for k, v in results[label][fold].items() if k != "examples"}))
    taps = "\n".join(f"- {label}: " + ", ".join(f"fold {f} `{r['tap']}` (base-class val mIoU {r['val_miou']:.1f})"
                                                 for f, r in per_fold.items())
                     for label, per_fold in results.items() if "tap" in next(iter(per_fold.values())))
    minutes = {label: sum(r["seconds"] for r in per_fold.values()) / 60 for label, per_fold in results.items()}
    cli = " ".join(argv) if argv else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    examples = args.out.with_name(f"{args.out.stem}_examples.png")
    figure(results, examples, EXAMPLES)
    text = f"""# Few-shot segmentation on the scene benchmark

Written by `python -m experiments.fewshot_benchmark {cli}`. {args.episodes} test episodes per fold and
setting ({SIZE}×{SIZE} scenes, seed 1000, fold f's five novel classes); mIoU = mean over classes of
ΣI/ΣU summed over that class's episodes, FB-IoU over all episodes (%). DiffewS: {args.train_steps} steps
of {args.batch_size} one-shot base-class episodes per fold, lr {args.lr}; prototype taps chosen on
{args.val_episodes} one-shot base-class episodes.

{table(results, args.folds)}

Does the trained model segment what the support shows? Control: 1-shot mean mIoU over the folds when
each query is given the support of another episode (mostly another class) and still scored against
its own class; and how much the query's mask logits move (mean absolute change over 64 one-shot test
episodes per fold, in % of the logits' standard deviation) when the support is swapped or removed:

{control_table(results, args.folds)}

Prototype taps chosen per fold:
{taps}

CPU minutes per arm (all folds, cached arms count their first run): """ + ", ".join(
        f"{k}: {v:.1f}" for k, v in minutes.items()) + f"""

![fold-0 one-shot episodes]({examples.name})
"""
    atomic_write(args.out, text.encode())
    if args.out == RESULTS / "fewshot_benchmark.md" and args.folds == [0, 1, 2, 3]:
        write_readme_table(summary(results, args.folds), marker="fewshot")
    print(text)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
