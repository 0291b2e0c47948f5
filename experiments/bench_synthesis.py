"""Synthesis speed with the DeepCache feature cache (``difffeat/cache.py``) on the scenes U-Net, measured in pairs.

Every arm denoises the same images from the same noise with the same deterministic DDIM sampler
(``difffeat.sample.sampling_scheduler``), in one process, interleaved over the repeats, so time ratios
compare like with like:

* **from noise**: ``steps`` DDIM steps from seeded Gaussian noise, from ``t = T - 1``;
* **img2img**: a generated scene (``difffeat.data.scenes``) noised to ``t0 = round(strength · (T - 1))`` and
  denoised from there in ``round(strength · steps)`` DDIM steps on the evenly spaced grid ``t0 … 0``.

img2img puts its grid on ``[0, t0]`` rather than cutting the first steps off the ``[0, T - 1]`` grid
(diffusers' pipelines): there the starting noise level moves with the step count (with 4 steps at strength
0.6 the trajectory would start at ``t = 333``, with 25 at ``t = 583``), so a sampler with fewer steps would
start from another noised image; here every arm of a mode starts from the same ``x_t0``. The grid is
``sampling_scheduler``'s own, built on the backbone's ``ᾱ`` up to ``t0``.

Arms: uncached (the reference), the cache at interval 1 (must equal the reference bit for bit: the check
fails the run otherwise), the cache at each interval ``N``, and for each ``N`` the **equal-compute
baseline**: the same sampler with fewer steps, as many as the cached run's measured wall time allows
(``round(steps · t_cached / t_uncached)``). Quality is the per-image PSNR (torchmetrics) of an arm's images
to the uncached full-step images, on the ``[-1, 1]`` range (``data_range`` 2). The cache is worth having
where it gives a higher PSNR than the baseline at the same time; the table says for each ``N`` whether it
does.

Times: the denoising loop alone, and end to end: scene rendering or noise drawing, noising, the loop,
clamping to 8-bit and PNG encoding (the detection adapter of ``difffeat synthesize`` is not part of it).
The FLOP ratio of a cached to a full U-Net step (``torch.utils.flop_counter``) is the noise-free reference
for the time ratio. The backbone is the DDPM-trained scenes U-Net (``configs/ddpm_scenes.yaml``) when its
folder exists, else the random-init ``sd-unet-scenes`` (said in the results: PSNR of a random network
measures only how far the cache moves its outputs).

Run: ``python -m experiments.bench_synthesis`` (writes ``experiments/results/bench_synthesis.{md,png}``).
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difffeat.backbones import create_backbone
from difffeat.backbones.base import Backbone
from difffeat.cache import DeepCache, cached_modules, skip_connections
from difffeat.data.scenes import SceneDataset
from difffeat.noise import FlowSchedule, NoiseSchedule
from difffeat.sample import sampling_scheduler
from difffeat.store import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
TRAINED = ROOT / ".cache" / "difffeat" / "backbones" / "sd-unet-scenes-ddpm"
FALLBACK = "sd-unet-scenes"
MODES = ("from noise", "img2img")


@dataclass
class Arm:
    """One way of sampling: a step count and an optional cache; filled with its measurements."""

    name: str
    steps: int
    cache: DeepCache | None = None
    images: torch.Tensor | None = None
    loop_s: list[float] = field(default_factory=list)  # CPU seconds per image (this process)
    total_s: list[float] = field(default_factory=list)
    loop_wall: list[float] = field(default_factory=list)  # wall seconds per image
    calls: dict[str, int] = field(default_factory=dict)

    def per_image(self) -> tuple[int, int]:
        """Full and cached U-Net steps of one image's trajectory."""
        if self.cache is None:
            return self.steps, 0
        full = len(self.cache.full_steps(self.steps))
        return full, self.steps - full


def load_backbone(name: str | None) -> tuple[Backbone, str, bool]:
    """The backbone to measure, its description, and whether it is trained."""
    if name is None:
        if (TRAINED / "difffeat-config.sha256").exists():
            return (create_backbone(str(TRAINED)).eval(),
                    f"`{TRAINED.relative_to(ROOT)}` (the scenes U-Net trained by `configs/ddpm_scenes.yaml`)", True)
        return (create_backbone(FALLBACK).eval(),
                f"`{FALLBACK}` with **random weights**: the trained `{TRAINED.relative_to(ROOT)}` did not exist "
                f"when this ran (`configs/ddpm_scenes.yaml` trains it); PSNR here measures only how far the cache "
                f"moves a random network's outputs, not image quality", False)
    return create_backbone(name).eval(), f"`{name}`", Path(name).is_dir()


def seed_inputs(backbone: Backbone, mode: str, n: int, seed: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The clean seed scenes (img2img; ``None`` from noise) and the Gaussian noise of every image."""
    size, c = backbone.latent_size, backbone.latent_channels
    noise = torch.randn((n, c, size, size), generator=torch.Generator().manual_seed(seed))
    if mode == "from noise":
        return None, noise
    scenes = SceneDataset(length=n, size=size, seed=seed)
    return torch.stack([scenes[i]["image"] for i in range(n)]), noise


def trajectory(mode: str, steps: int, strength: float, schedule: NoiseSchedule) -> tuple[int, int]:
    """``(t0, steps run)`` of a mode: ``(T - 1, steps)`` from noise, strength-scaled for img2img."""
    T = schedule.num_train_timesteps
    if mode == "img2img":
        return round(strength * (T - 1)), max(1, round(strength * steps))
    return T - 1, steps


def start_scheduler(schedule: NoiseSchedule, t0: int, steps: int) -> tuple:
    """``sampling_scheduler`` on the grid ``t0 … 0``: built from the schedule's ``ᾱ`` cut after ``t0``.

    The network's timesteps are the grid points themselves, so they mean what they mean to the backbone.
    """
    cut = NoiseSchedule(schedule.alphas_cumprod[:t0 + 1], schedule.prediction_type)
    return sampling_scheduler(cut if t0 < schedule.num_train_timesteps - 1 else schedule, steps)


@torch.inference_mode()
def synthesize(backbone: Backbone, mode: str, arm: Arm, n: int, batch_size: int, seed: int, strength: float
               ) -> torch.Tensor:
    """Runs one arm over ``n`` images, appends its times per image to the arm; returns the images."""
    from PIL import Image

    loop = total = wall = 0.0
    out = []
    cache = arm.cache
    with cache.attach(backbone) if cache is not None else nullcontext():
        for start in range(0, n, batch_size):
            began = time.process_time()
            rows = min(batch_size, n - start)
            scenes, noise = seed_inputs(backbone, mode, start + rows, seed)  # the first images: the same per arm
            noise = noise[start:]
            t0, _ = trajectory(mode, 1, strength, backbone.schedule)
            scheduler, model_t, step_t = start_scheduler(backbone.schedule, t0, arm.steps)
            x = noise if scenes is None else backbone.schedule.add_noise(scenes[start:], noise,
                                                                         torch.full((rows,), t0))
            if cache is not None:
                cache.reset(len(model_t))
            loop_began, wall_began = time.process_time(), time.perf_counter()
            for tm, ts in zip(model_t, step_t, strict=True):
                pred = backbone(x, torch.full((rows,), int(tm), dtype=torch.long))
                x = scheduler.step(pred, ts, x).prev_sample
            loop += time.process_time() - loop_began
            wall += time.perf_counter() - wall_began
            x = x.clamp(-1, 1)
            for image in ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
                Image.fromarray(image).save(io.BytesIO(), format="PNG")
            out.append(x.float())
            total += time.process_time() - began
    if cache is not None:
        arm.calls = dict(cache.stats)
    arm.loop_s.append(loop / n)
    arm.total_s.append(total / n)
    arm.loop_wall.append(wall / n)
    return torch.cat(out)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) on the ``[-1, 1]`` range; ``inf`` for identical images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(images, reference, data_range=2.0, reduction="none", dim=(1, 2, 3))


def step_flops(backbone: Backbone, branch: int) -> tuple[int, int]:
    """FLOPs of one full and one cached U-Net step (batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    t = torch.full((1,), 500)
    with torch.inference_mode(), DeepCache(interval=2, branch=branch).attach(backbone):
        counts = []
        for _ in range(2):  # step 0 is full, step 1 cached
            with FlopCounterMode(display=False) as counter:
                backbone(x, t)
            counts.append(counter.get_total_flops())
    return counts[0], counts[1]


@dataclass
class StepCost:
    """CPU seconds of one full and one cached U-Net call at the benchmark's batch, alternated ``pairs`` times."""

    full: list[float]
    cached: list[float]

    @property
    def ratio(self) -> float:
        """A cached call's cost in full calls: the ratio of the fastest of each (the least disturbed)."""
        return min(self.cached) / min(self.full)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.cached) / statistics.median(self.full)


@torch.inference_mode()
def step_cost(backbone: Backbone, branch: int, batch: int, pairs: int) -> StepCost:
    """Times full and cached U-Net calls alternately (after a warm-up pair), on the same input."""
    x = torch.randn(batch, backbone.latent_channels, backbone.latent_size, backbone.latent_size,
                    generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500)
    times: list[float] = []
    with DeepCache(interval=2, branch=branch).attach(backbone):
        for _ in range(2 * (pairs + 1)):  # calls alternate full, cached, full, …
            began = time.process_time()
            backbone(x, t)
            times.append(time.process_time() - began)
    return StepCost(times[2::2], times[3::2])


def run_mode(backbone: Backbone, mode: str, opts: argparse.Namespace, ratio: float) -> list[Arm]:
    """All arms of one mode, interleaved over the repeats; the equal-compute baselines sized after repeat 1.

    The fewer-step arms bracket each cached arm's cost in full steps, ``full + cached · ratio`` (``ratio``: a
    cached call's cost in full calls, :func:`step_cost`), and its cost estimated from its measured time.
    """
    def cache(interval: int) -> DeepCache:
        return DeepCache(interval, branch=opts.branch, schedule=opts.schedule)

    _, steps = trajectory(mode, opts.steps, opts.strength, backbone.schedule)
    main = [Arm("uncached", steps), Arm("cache N=1", steps, cache(1))]
    main += [Arm(f"cache N={k}", steps, cache(k)) for k in opts.intervals]
    baselines: list[Arm] = []
    warm = Arm("warm-up", 2)
    synthesize(backbone, mode, warm, min(opts.batch_size, opts.images), opts.batch_size, opts.seed, opts.strength)
    bar = tqdm(desc=f"{mode} arms", unit="arm")
    for repeat in range(opts.repeats):
        for arm in main + baselines:
            images = synthesize(backbone, mode, arm, opts.images, opts.batch_size, opts.seed, opts.strength)
            if arm.images is not None and not torch.equal(images, arm.images):
                raise RuntimeError(f"{mode}, {arm.name}: repeat {repeat + 1} gave other images than repeat 1")
            arm.images = images
            bar.update()
        if repeat == 0:
            # the step counts just below and above each cached run's cost (the loop's time is linear in steps)
            ref = statistics.median(main[0].loop_s)
            counts = set()
            for arm in main[2:]:
                full, cached = arm.per_image()
                estimates = (steps * statistics.median(arm.loop_s) / ref, full + cached * ratio)
                low, high = max(1, math.floor(min(estimates))), max(1, min(steps - 1, math.ceil(max(estimates))))
                counts |= set(range(low, high + 1))
            baselines += [Arm(f"{k} steps", k) for k in sorted(counts)]
            for arm in baselines:
                arm.images = synthesize(backbone, mode, arm, opts.images, opts.batch_size, opts.seed, opts.strength)
                bar.update()
    bar.close()
    if not torch.equal(main[1].images, main[0].images):
        diff = float((main[1].images - main[0].images).abs().max())
        raise RuntimeError(f"{mode}: the cache at interval 1 differs from no cache (max |diff| {diff:.3g})")
    return main + baselines


def _fmt_psnr(values: torch.Tensor) -> tuple[str, str]:
    """Mean and min PSNR; identical images (infinite PSNR) are counted apart."""
    exact = torch.isinf(values)
    if exact.all():
        return "exact", "exact"
    note = f" ({int(exact.sum())} exact)" if exact.any() else ""
    return f"{float(values[~exact].mean()):.2f}{note}", f"{float(values.min()):.2f}"


def fit_cost(arms: list[Arm], flop_ratio: float) -> tuple[float, str]:
    """The cost of a cached step in full steps, fitted to every arm's CPU time: ``t = a·full + b·cached``.

    No intercept: the per-image work outside the U-Net calls (the scheduler's steps ride on each call) is
    too small to fit apart from the timing noise.

    Returns ``(b / a, how it was found)``; the FLOP ratio where the fit is degenerate (a non-positive cost).
    """
    rows = torch.tensor([a.per_image() for a in arms], dtype=torch.float64)
    times = torch.tensor([statistics.median(a.loop_s) for a in arms], dtype=torch.float64)
    a, b = torch.linalg.lstsq(rows, times[:, None]).solution.flatten().tolist()
    if a <= 0 or b <= 0:
        return flop_ratio, f"the FLOP ratio (the fit of the times was degenerate: a={a:.4f}, b={b:.4f})"
    return b / a, (f"fitted to all {len(arms)} arms' CPU times: full step {a * 1e3:.1f} ms, cached step "
                   f"{b * 1e3:.1f} ms per image; FLOP ratio {flop_ratio:.3f}")


def _interpolate(x: float, points: list[tuple[float, float, Arm]]) -> tuple[float, Arm, Arm] | None:
    """Linear interpolation of ``(x, y, arm)`` points at ``x``, with the bracketing arms; ``None`` outside them."""
    below = [p for p in points if p[0] <= x]
    above = [p for p in points if p[0] >= x]
    if not below or not above:
        return None
    lo, hi = below[-1], above[0]
    w = 0.0 if hi[0] == lo[0] else (x - lo[0]) / (hi[0] - lo[0])
    return lo[1] + w * (hi[1] - lo[1]), lo[2], hi[2]


def verdict(arm: Arm, psnrs: dict[str, torch.Tensor], baselines: list[Arm], ratio: float) -> tuple[str, bool]:
    """Whether a cached arm beats the fewer-step sampler at its cost; the line and whether it wins.

    The cached arm costs ``k = full + cached · ratio`` full steps (``ratio`` from :func:`step_cost`); the
    fewer-step sampler's PSNR at ``k`` steps is interpolated between the measured step counts around ``k``
    (PSNR against step count has no timing noise). As a cross-check the same is done on the arms' measured
    times directly.
    """
    full, cached = arm.per_image()
    k = full + cached * ratio
    p_c = float(psnrs[arm.name].mean())
    by_steps = sorted((b.steps, float(psnrs[b.name].mean()), b) for b in baselines)
    found = _interpolate(k, by_steps)
    t_c = statistics.median(arm.loop_s)
    by_time = sorted((statistics.median(b.loop_s), float(psnrs[b.name].mean()), b) for b in baselines)
    direct = _interpolate(t_c, by_time)
    check = ("outside the measured fewer-step times" if direct is None else
             f"at its measured time {t_c:.3f} CPU s/image: {direct[0]:.2f} dB, "
             + ("agrees" if (p_c > direct[0]) == (found is not None and p_c > found[0]) else "disagrees"))
    if found is None:
        return (f"**undecided**: {p_c:.2f} dB at a cost of {k:.2f} full steps, outside the measured fewer-step "
                f"counts {[b.steps for b in baselines]} (by time: {check})", False)
    p_b, lo, hi = found
    wins = int((psnrs[arm.name] > psnrs[hi.name]).sum())
    head = "**caching wins**" if p_c > p_b else "**caching does not win**"
    return (f"{head}: {p_c:.2f} dB at the cost of {k:.2f} full steps vs {p_b:.2f} dB for the uncached sampler "
            f"at that many steps (interpolated between {lo.steps} and {hi.steps} steps); higher PSNR than "
            f"{hi.steps} steps on {wins} of {len(psnrs[arm.name])} images. Cross-check by time {check}.",
            p_c > p_b)


def report(results: dict[str, list[Arm]], backbone: Backbone, described: str, trained: bool,
           opts: argparse.Namespace, flops: tuple[int, int], cost: StepCost, elapsed: float, command: str
           ) -> tuple[str, list[str]]:
    """The results markdown and the verdict lines."""
    full_flops, cached_flops = flops
    skips = skip_connections(backbone)
    skipped = cached_modules(backbone, opts.branch)
    lines = [
        "# Synthesis speed with the DeepCache feature cache",
        "",
        f"Written by `{command}`; rerun that command to reproduce.",
        f"Run {datetime.date.today()} on {platform.processor() or platform.machine()}, CPU, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {elapsed:.0f} s wall and "
        f"{time.process_time() / 60:.1f} CPU min in all. "
        f"Times are medians of {opts.repeats} repeat(s), arms interleaved, all in this process. They are CPU "
        f"seconds of this process (`time.process_time`): the machine is shared, and wall time counts the waits "
        f"for a core other jobs hold; the wall-time columns are given beside them. Speed-ups, the "
        f"equal-compute matching and the verdicts use CPU time.",
        "",
        f"Backbone: {described}; {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f} M parameters, "
        f"{backbone.latent_size}×{backbone.latent_size}×{backbone.latent_channels} pixels.",
        f"Sampler: deterministic DDIM (η = 0, `difffeat.sample.sampling_scheduler`), {opts.steps} steps from noise; "
        f"img2img at strength {opts.strength}: the seed scene noised to t0 = "
        f"{trajectory('img2img', opts.steps, opts.strength, backbone.schedule)[0]}, then "
        f"{trajectory('img2img', opts.steps, opts.strength, backbone.schedule)[1]} steps on the grid t0 … 0 (every "
        f"img2img arm starts from that same noised image). {opts.images} images per arm in batches of "
        f"{opts.batch_size}, seed {opts.seed}: every arm sees the same scenes and noise.",
        "Equal-compute baseline: the uncached sampler with the step counts around each cached arm's cost. A "
        "cached arm's cost in full steps is its full steps plus its cached steps times the cost of a cached step "
        "(measured alone, below); the fewer-step sampler's PSNR at that many steps is interpolated between the "
        "measured step counts (PSNR against steps has no timing noise), and checked against the same "
        "interpolation on the arms' measured times.",
        f"Cache: schedule `{opts.schedule}`, branch {opts.branch} (skip connection `{skips[opts.branch].producer}` → "
        f"`{skips[opts.branch].consumer}`; a cached step skips {', '.join(f'`{m}`' for m in skipped)}). "
        f"FLOPs of one step at batch 1: full {full_flops / 1e9:.3f} GFLOP, cached {cached_flops / 1e9:.3f} GFLOP "
        f"({full_flops / cached_flops:.2f}× fewer). CPU time of one call at batch {opts.batch_size}, full and cached "
        f"alternated {len(cost.full)} times: full {min(cost.full) * 1e3:.0f} ms, cached {min(cost.cached) * 1e3:.0f} "
        f"ms (fastest of each), so a cached step costs **{cost.ratio:.3f} full steps** (medians: "
        f"{cost.median_ratio:.3f}).",
        "",
        "PSNR: per image, to the uncached full-step images, `[-1, 1]` range; mean (min) over the images. "
        "Speed-up: uncached time / arm time, loop = the denoising loop, end to end = seed scene or noise, "
        "noising, loop, 8-bit conversion and PNG encoding (without the detection adapter).",
        "",
    ]
    verdicts, wins = [], 0
    flop_ratio = cached_flops / full_flops
    for mode, arms in results.items():
        ref = arms[0]
        ref_loop, ref_total = statistics.median(ref.loop_s), statistics.median(ref.total_s)
        ref_wall = statistics.median(ref.loop_wall)
        lines += [f"## {mode}", "",
                  "| arm | steps run | U-Net calls (full / cached) | loop CPU s/image | loop speed-up | "
                  "end-to-end CPU s/image | end-to-end speed-up | loop wall s/image | wall speed-up | "
                  "PSNR dB mean | PSNR dB min |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        psnrs = {}
        for arm in arms:
            loop, total = statistics.median(arm.loop_s), statistics.median(arm.total_s)
            wall = statistics.median(arm.loop_wall)
            values = psnr(arm.images, ref.images)
            psnrs[arm.name] = values
            mean, low = _fmt_psnr(values)
            batches = -(-opts.images // opts.batch_size)
            calls = f"{arm.calls['full']} / {arm.calls['cached']}" if arm.calls else f"{arm.steps * batches} / 0"
            lines.append(f"| {arm.name} | {arm.steps} | {calls} | {loop:.3f} | {ref_loop / loop:.2f}× | {total:.3f} | "
                         f"{ref_total / total:.2f}× | {wall:.3f} | {ref_wall / wall:.2f}× | {mean} | {low} |")
        lines.append("")
        fitted, how = fit_cost(arms, flop_ratio)
        lines += [f"Cross-check of the cost of a cached step: {fitted:.3f} full steps {how}; measured alone: "
                  f"{cost.ratio:.3f}.", ""]
        baselines = [a for a in arms if a.cache is None and a is not ref]
        for arm in arms[2:]:
            if arm.cache is not None:
                line, won = verdict(arm, psnrs, baselines, cost.ratio)
                verdicts.append(f"- {mode}, {arm.name[6:]}: {line}")
                wins += won
    lines += ["## Verdict: cache vs the same sampler with fewer steps at equal compute", "", *verdicts, ""]
    if not wins:
        lines += ["**No cached setting beat the fewer-step sampler at equal time here: on this model and at this "
                  "scale the cache is not worth having.**", ""]
    exact = ", ".join(f"{m}: bit-identical" for m in results)
    lines += [f"Interval 1 vs no cache ({exact}; the run stops otherwise). "
              f"Loop time of interval 1 over uncached: " +
              ", ".join(f"{m} {statistics.median(a[1].loop_s) / statistics.median(a[0].loop_s):.3f}"
                        for m, a in results.items())
              + " (the hooks' overhead plus timing noise: both arms run the same computation).", ""]
    if not trained:
        lines += ["**The backbone is untrained**: these PSNR figures compare outputs of a random network. "
                  "Rerun once `configs/ddpm_scenes.yaml` has trained the scenes U-Net.", ""]
    lines += ["![PSNR vs cost](bench_synthesis.png)", ""]
    return "\n".join(lines), verdicts


def figure(results: dict[str, list[Arm]], opts: argparse.Namespace, ratio: float) -> bytes:
    """PSNR against cost per mode (cache and fewer-step arms), and the first image of each arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_modes = len(results)
    arms_per_mode = max(len(a) for a in results.values())
    fig = plt.figure(figsize=(max(10, 1.6 * arms_per_mode), 4 + 2.2 * n_modes))
    grid = fig.add_gridspec(1 + n_modes, max(n_modes, arms_per_mode), height_ratios=[2.2] + [1] * n_modes)
    per_plot = max(n_modes, arms_per_mode) // n_modes
    for m, (mode, arms) in enumerate(results.items()):
        ax = fig.add_subplot(grid[0, m * per_plot:(m + 1) * per_plot])
        ref = arms[0]
        for kind, style, label in (("cache", "o-", "DeepCache N"), ("steps", "s--", "fewer steps")):
            pts = []
            for arm in arms[2:]:
                if (arm.cache is not None) == (kind == "cache"):
                    full, cached = arm.per_image()
                    pts.append((full + cached * ratio, float(psnr(arm.images, ref.images).mean()), arm.name))
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            for x, y, name in pts:
                ax.annotate(name.replace("cache ", "").replace(" steps", ""), (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set(xlabel=f"cost in full U-Net steps (a cached step = {ratio:.3f}, measured)",
               ylabel="PSNR to uncached, dB", title=mode)
        ax.legend(fontsize=8)
        for j, arm in enumerate(arms):
            axi = fig.add_subplot(grid[1 + m, j])
            axi.imshow(((arm.images[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
            axi.set_title(arm.name, fontsize=7)
            axi.set_xticks([])
            axi.set_yticks([])
            if j == 0:
                axi.set_ylabel(f"{mode}\nimage 0", fontsize=8)
    fig.suptitle(f"DeepCache (branch {opts.branch}, {opts.schedule}) vs fewer steps, {opts.steps} DDIM steps")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DeepCache synthesis benchmark (paired, same seeds and sampler)")
    parser.add_argument("--backbone", default=None,
                        help=f"registered name or folder (default: {TRAINED.relative_to(ROOT)} if trained, "
                             f"else {FALLBACK})")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the full trajectory")
    parser.add_argument("--strength", type=float, default=0.6, help="img2img noise strength")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--schedule", default="uniform")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cost-pairs", type=int, default=10, help="alternated full/cached calls timed alone")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(args)
    if not 0 < opts.strength <= 1:
        parser.error(f"--strength must lie in (0, 1], got {opts.strength}")
    if opts.images < 1 or opts.batch_size < 1 or opts.repeats < 1 or opts.steps < 1:
        parser.error("--images, --batch-size, --repeats and --steps must be >= 1")
    command = "python -m experiments.bench_synthesis" + ("" if args is None and len(sys.argv) == 1 else
                                                         " " + " ".join(sys.argv[1:] if args is None else args))
    began = time.perf_counter()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    backbone, described, trained = load_backbone(opts.backbone)
    DeepCache(2, branch=opts.branch, schedule=opts.schedule, steps=opts.steps)  # bad settings fail before any run
    cached_modules(backbone, opts.branch)
    if isinstance(backbone.schedule, FlowSchedule):
        parser.error("the benchmark's img2img grid is a DDPM one; give a DDPM-trained backbone")
    print(f"backbone: {described}")
    flops = step_flops(backbone, opts.branch)
    cost = step_cost(backbone, opts.branch, min(opts.batch_size, opts.images), opts.cost_pairs)
    print(f"a cached step costs {cost.ratio:.3f} full steps (FLOPs: {flops[1] / flops[0]:.3f})")
    results = {mode: run_mode(backbone, mode, opts, cost.ratio) for mode in opts.modes}
    elapsed = time.perf_counter() - began
    text, verdicts = report(results, backbone, described, trained, opts, flops, cost, elapsed, command)
    opts.out.mkdir(parents=True, exist_ok=True)
    atomic_write(opts.out / "bench_synthesis.png", figure(results, opts, cost.ratio))
    atomic_write(opts.out / "bench_synthesis.md", text.encode())
    print("\n".join(verdicts))
    print(f"wrote {opts.out / 'bench_synthesis.md'} and .png in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
