"""One-pass synthesis of a detection dataset (DiffusionEngine): images and their boxes from one denoising pass.

For output image ``i`` (everything drawn from a generator seeded by ``(seed, i)``, so the dataset does not
depend on the order or the number of runs that made it):

1. a seed image of the labelled seed folder and a strength ``s`` from ``strength`` (default
   ``[0.4, 0.8]``) are drawn; the image is noised to timestep ``round(s · (T - 1))`` (img2img, as diffusers'
   ``StableDiffusionImg2ImgPipeline`` starts its pass part-way down the schedule);
2. it is denoised by a diffusers ``DDIMScheduler`` (η = 0) in ``max(1, round(s · steps))`` steps whose last
   network call is at the predictor's timestep (the timestep its features were trained at); as in
   :mod:`difffeat.sample`, the scheduler is built over the evenly spaced grid itself, so every ``step``
   goes exactly from one grid point to the next and the last one to the clean image;
3. the predictor (the detection adapter, passed in: the library never imports a head) reads the taps
   recorded by hooks during that *last* network call of the same pass, and predicts boxes; those with
   score above ``score_threshold`` are clipped to the image (logged), degenerate ones dropped (logged).

Output folder (a COCO folder, :mod:`difffeat.data.coco`)::

    out/synthesis.json     the run's settings (the folder belongs to them; another run's are refused)
    out/images/000000.png  written atomically, then
    out/parts/000000.json  its image record and annotations, written atomically: an image is done iff
                           its part exists, so a kill -9 loses at most the image in flight
    out/annotations.json   assembled at the end, validated and loaded by pycocotools before it is renamed
                           into place; only then does the run report success

Categories are the seed set's (same ids and names); every class the predictor names must be one of them.
Only DDPM-type (ε / v / x0) schedules are sampled; flow models are refused (their img2img start is a
different interpolation and no detection adapter here is trained on one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from difffeat.data.coco import (
    ANNOTATIONS,
    IMAGES,
    CocoDetection,
    CocoError,
    clean_boxes,
    coco_box,
    save_image,
    write_coco,
)
from difffeat.noise import FlowSchedule, NoiseSchedule
from difffeat.store import atomic_write

__all__ = ["SETTINGS", "BoxPredictor", "SynthesisError", "img2img_scheduler", "synthesize"]

log = logging.getLogger(__name__)

#: the settings file that ties an output folder to one run
SETTINGS = "synthesis.json"
PARTS = "parts"


class SynthesisError(ValueError):
    """Settings or inputs synthesis refuses (the message names the folder, key or range)."""


class BoxPredictor(Protocol):
    """What synthesis needs of a detection head (:class:`heads.detection.DetectionAdapter` is one)."""

    backbone: Any
    layers: list[str]
    timestep: int
    categories: list[str]

    def spec(self) -> dict[str, Any]:
        """Everything that changes its boxes (weights included)."""

    def predict_taps(self, taps: dict[str, torch.Tensor], image_size: tuple[int, int],
                     score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Boxes, scores and labels from the taps of one network call."""


def img2img_scheduler(schedule: NoiseSchedule, t_start: int, t_end: int, steps: int) -> tuple[Any, torch.Tensor,
                                                                                               list[int]]:
    """A DDIM scheduler over ``steps`` evenly spaced timesteps from ``t_start`` down to ``t_end``.

    Args:
        schedule: the backbone's (DDPM-type) noise schedule.
        t_start: the timestep the seed image is noised to (the first network call's).
        t_end: the last network call's timestep; its ``step`` lands on the clean image.
        steps: network calls.

    Returns:
        ``(scheduler, model_timesteps, step_timesteps)`` as :func:`difffeat.sample.sampling_scheduler`;
        ``scheduler.add_noise(x0, noise, torch.tensor([steps - 1]))`` noises to ``t_start``.

    Raises:
        SynthesisError: a flow schedule, an unknown prediction type, or a grid that is not strictly
            decreasing (``t_start - t_end < steps - 1``).
    """
    from diffusers import DDIMScheduler

    from difffeat.sample import PREDICTION_TYPES

    if isinstance(schedule, FlowSchedule):
        raise SynthesisError("synthesis samples DDPM-type backbones (epsilon / v_prediction / sample); this one is a "
                             "flow model")
    if schedule.prediction_type not in PREDICTION_TYPES:
        raise SynthesisError(f"unknown prediction type {schedule.prediction_type!r}; expected one of "
                             f"{PREDICTION_TYPES}")
    grid = torch.linspace(t_start, t_end, steps).round().long() if steps > 1 else torch.tensor([t_start])
    if steps < 1 or (steps > 1 and not (grid[1:] < grid[:-1]).all()) or t_start < t_end:
        raise SynthesisError(f"cannot place {steps} steps from timestep {t_start} down to {t_end}")
    a = schedule.alphas_cumprod[grid.flip(0)]
    betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
    scheduler = DDIMScheduler(num_train_timesteps=steps, trained_betas=betas.tolist(), clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                              prediction_type=schedule.prediction_type)
    scheduler.alphas_cumprod = a.float()
    scheduler.set_timesteps(steps)
    return scheduler, grid, scheduler.timesteps.tolist()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _seed_digest(seeds: Path, seed_json: dict[str, Any]) -> str:
    """The seed set's identity: its json and the bytes of every image it lists."""
    h = hashlib.sha256(_digest(seed_json).encode())
    for im in seed_json["images"]:
        h.update(hashlib.sha256((seeds / IMAGES / im["file_name"]).read_bytes()).digest())
    return h.hexdigest()


def _image_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"synthesize:{seed}:{i}".encode(), digest_size=8).digest(), "little") >> 1


def _check_args(num_images: int, steps: int, strength: Sequence[float], score_threshold: float) -> None:
    if num_images < 1:
        raise SynthesisError(f"num_images must be >= 1, got {num_images}")
    if steps < 1:
        raise SynthesisError(f"steps must be >= 1, got {steps}")
    if len(strength) != 2 or not 0 < strength[0] <= strength[1] <= 1:
        raise SynthesisError(f"strength must be a range (low, high) with 0 < low <= high <= 1, got {strength}")
    if not 0 <= score_threshold < 1:
        raise SynthesisError(f"score_threshold must be in [0, 1), got {score_threshold}")


def _claim_folder(out: Path, settings: dict[str, Any]) -> None:
    """Makes ``out`` this run's folder, or checks it already is; refuses another run's or a foreign folder."""
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            raise SynthesisError(f"{out} holds a dataset synthesized with other settings ({', '.join(differ)} differ: "
                                 f"{ {k: old.get(k) for k in differ} } there, { {k: settings.get(k) for k in differ} } "
                                 f"now); resume only with the same settings, or choose another folder")
        return
    if out.exists() and any(out.iterdir()):
        raise SynthesisError(f"{out} is not empty and holds no {SETTINGS}: not a synthesis run's folder; choose "
                             f"another folder")
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    (out / PARTS).mkdir(exist_ok=True)
    atomic_write(path, json.dumps(settings, indent=1, sort_keys=True).encode())


def _remove_stale(out: Path) -> None:
    """Temporary files a killed writer left (``atomic_write`` renames complete files only)."""
    for folder in (out, out / IMAGES, out / PARTS):
        for p in folder.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)


@torch.no_grad()
def _one_image(predictor: BoxPredictor, x0: torch.Tensor, gen: torch.Generator, strength: Sequence[float],
               steps: int, score_threshold: float, cache: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    backbone = predictor.backbone
    param = next(backbone.parameters())
    s = float(strength[0] + (strength[1] - strength[0]) * torch.rand((), generator=gen))
    T = backbone.schedule.num_train_timesteps
    n = max(1, round(s * steps))
    t_start = max(round(s * (T - 1)), predictor.timestep + n - 1)
    scheduler, model_t, step_t = img2img_scheduler(backbone.schedule, t_start, predictor.timestep, n)
    latents = backbone.encode(x0[None].to(param))
    noise = torch.randn(latents.shape, generator=gen).to(latents)
    x = scheduler.add_noise(latents, noise, torch.tensor([n - 1]))
    c = x.shape[1]
    if cache is not None:
        cache.reset(n)  # this pass's number of steps (img2img runs fewer than a full-strength pass)
    with cache.attach(backbone.model) if cache is not None else nullcontext():
        for k, (tm, ts) in enumerate(zip(model_t, step_t, strict=True)):
            t = torch.full((1,), int(tm), device=x.device, dtype=torch.long)
            if k == n - 1:  # the final step: the adapter reads this call's taps
                with backbone.tap(predictor.layers, stop_early=False) as found:
                    pred = backbone(x, t)[:, :c]
                taps = dict(found)
            else:
                pred = backbone(x, t)[:, :c]
            x = scheduler.step(pred, ts, x).prev_sample
    if backbone.vae is not None:
        vae = backbone.vae
        x = vae.decode(x / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)).sample
    image = x[0].clamp(-1, 1).float().cpu()
    pred_boxes = predictor.predict_taps(taps, tuple(image.shape[-2:]), score_threshold)[0]
    return image, {k: v.cpu() for k, v in pred_boxes.items()}, s


def synthesize(predictor: BoxPredictor, seeds: str | Path, out: str | Path, num_images: int, steps: int = 25,
               strength: Sequence[float] = (0.4, 0.8), score_threshold: float = 0.3, seed: int = 0,
               cache: Any = None, progress: bool = True) -> dict[str, Any]:
    """Synthesizes ``num_images`` images with boxes from a labelled seed COCO folder into the COCO folder ``out``.

    Resumable: a rerun with the same settings continues where a stopped run (kill -9 included) left off and
    gives the same bytes as an uninterrupted run.

    Args:
        predictor: the box predictor (its ``backbone`` denoises; see :class:`BoxPredictor`).
        seeds: the seed COCO folder (its categories name the output's).
        out: output folder (created; see the module docstring).
        num_images: images to synthesize.
        steps: DDIM steps of a full-strength pass (a pass of strength ``s`` takes ``round(s · steps)``).
        strength: the range strengths are drawn from (the reference's ``[0.4, 0.8]``).
        seed: synthesis seed (same seed, same dataset).
        score_threshold: boxes scoring at most this are dropped.
        cache: optional feature cache (:class:`difffeat.cache.DeepCache`): ``cache.reset(steps)`` is called
            before each image with its number of steps, and ``cache.attach(unet)`` is a context manager
            around its denoising loop. Its ``config()`` (or ``spec()``) is a setting. The adapter reads the
            final step's taps, so the cache should run that step in full (``DeepCache(last_full=True)``);
            otherwise the deep taps hold the features of the last full step.
        progress: show a progress bar.

    Returns:
        ``{"out", "annotations", "images", "boxes", "new_images", "seconds", "images_per_s"}``.

    Raises:
        SynthesisError: bad arguments, a folder of another run, a predictor class not in the seed set.
        CocoError / FileNotFoundError: a seed folder that is not a valid COCO folder or has no images.
    """
    _check_args(num_images, steps, strength, score_threshold)
    seeds, out = Path(seeds), Path(out)
    seed_set = CocoDetection(seeds)
    from difffeat.data.coco import load_coco

    seed_json = load_coco(seeds)
    name_to_id = {c["name"]: int(c["id"]) for c in seed_json["categories"]}
    unknown = [c for c in predictor.categories if c not in name_to_id]
    if unknown:
        raise SynthesisError(f"the predictor's categories {unknown} are not in the seed set {seeds} "
                             f"(its categories: {sorted(name_to_id)})")
    label_to_id = [name_to_id[c] for c in predictor.categories]
    cache_spec = None if cache is None else next(
        (getattr(cache, m)() for m in ("config", "spec") if callable(getattr(cache, m, None))), repr(cache))
    settings = {"version": 1, "seed": seed, "num_images": num_images, "steps": steps,
                "strength": [float(v) for v in strength], "score_threshold": float(score_threshold),
                "predictor": _digest(predictor.spec()), "seeds": _seed_digest(seeds, seed_json), "cache": cache_spec}
    _claim_folder(out, settings)
    _remove_stale(out)
    done = {int(p.stem) for p in (out / PARTS).glob("*.json")}
    todo = [i for i in range(num_images) if i not in done]
    start = time.perf_counter()
    bar = tqdm(todo, disable=not progress, desc="synthesizing", initial=len(done), total=num_images)
    for count, i in enumerate(bar, 1):
        gen = torch.Generator().manual_seed(_image_seed(seed, i))
        j = int(torch.randint(len(seed_set), (), generator=gen))
        image, pred, s = _one_image(predictor, seed_set[j]["image"], gen, strength, steps, score_threshold, cache)
        h, w = image.shape[-2:]
        boxes, keep = clean_boxes(pred["boxes"].float(), w, h, where=f"{out}/{IMAGES}/{i:06d}.png")
        name = f"{i:06d}.png"
        save_image(out / IMAGES / name, image)
        anns = [{"image_id": i, "category_id": label_to_id[int(lb)], "bbox": coco_box(b.tolist()),
                 "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0, "score": float(sc)}
                for b, lb, sc in zip(boxes, pred["labels"][keep], pred["scores"][keep], strict=True)]
        part = {"image": {"id": i, "file_name": name, "width": int(w), "height": int(h), "seed_image": j,
                          "seed_image_id": seed_set.images[j]["id"], "strength": s}, "annotations": anns}
        atomic_write(out / PARTS / f"{i:06d}.json", json.dumps(part).encode())
        bar.set_postfix(img_s=f"{count / (time.perf_counter() - start):.2f}")
    seconds = time.perf_counter() - start
    images, annotations = [], []
    for i in range(num_images):
        part = json.loads((out / PARTS / f"{i:06d}.json").read_text())
        images.append(part["image"])
        for a in part["annotations"]:
            annotations.append({"id": len(annotations) + 1, **a})
    data = {"info": {"description": "difffeat one-pass synthesis", "settings": settings, "seed_set": str(seeds)},
            "images": images, "annotations": annotations, "categories": seed_json["categories"]}
    try:
        write_coco(out / ANNOTATIONS, data, out / IMAGES)
    except CocoError as err:
        raise CocoError(f"the synthesized dataset in {out} failed validation: {err}") from err
    rate = len(todo) / seconds if todo and seconds > 0 else math.nan
    summary = {"out": str(out), "annotations": str(out / ANNOTATIONS), "images": num_images,
               "boxes": len(annotations), "new_images": len(todo), "seconds": seconds, "images_per_s": rate}
    if progress:
        print(f"synthesized {len(todo)} new images ({num_images} in {out}, {len(annotations)} boxes) in "
              f"{seconds:.1f} s: {rate:.3f} images/s; {out / ANNOTATIONS} validated by pycocotools")
    return summary
