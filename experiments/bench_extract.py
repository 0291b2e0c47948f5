"""Extraction benchmark on a Stable-Diffusion-shaped U-Net (``sd-unet-small``: SD-1.x layout, 1/5 width,
32×32×4 latents), as ratios measured in one run:

* early exit after ``up_blocks.1`` vs a full forward with the same hooks (wall time), with the FLOP ratio
  of that prefix to the full network (counted by ``torch.utils.flop_counter``) as the reference;
* four timesteps batched along the batch axis vs a Python loop over them;
* resident-memory growth during a whole extraction of N and 10·N images into a feature store with
  per-pixel features (each run in a fresh process), which stays flat because shards stream to disk.

Run: ``python -m experiments.bench_extract`` (writes ``experiments/results/bench_extract.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from difffeat.backbones import create_backbone
from difffeat.extract import FeatureExtractor
from difffeat.readout import GlobalAvg

RESULTS = Path(__file__).resolve().parent / "results"
TAP = "up_blocks.1"
TIMESTEPS = [50, 200, 400, 800]


class RandomLatents(Dataset):
    """Seeded Gaussian latents ``(4, 32, 32)``; a stand-in dataset for the memory run."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fingerprint = hashlib.sha256(f"random-latents:{n}".encode()).hexdigest()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        gen = torch.Generator().manual_seed(i)
        return {"image": torch.randn(4, 32, 32, generator=gen), "index": i}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class _RssSampler:
    """Samples this process's resident set size every few milliseconds (``/proc/self/statm``)."""

    def __init__(self, interval: float = 0.005) -> None:
        import os
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.baseline = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def memory_run(n: int) -> None:
    """Child process: extract ``n`` latents into a temporary store; print the RSS growth (MiB) as JSON."""
    from difffeat.predict import ExtractionModule, extract_to_store
    from difffeat.readout import PerPixel

    module = ExtractionModule("sd-unet-small", [TAP], [200], readout=PerPixel(32))
    _ = module.extractor.backbone.feature_info  # the one-off probe forward, outside the measured span
    with tempfile.TemporaryDirectory() as tmp:
        with _RssSampler() as rss:
            fs = extract_to_store(module, RandomLatents(n), tmp, shard_size=16,
                                  trainer={"accelerator": "cpu", "enable_progress_bar": False,
                                           "enable_model_summary": False})
        size = sum(p.stat().st_size for p in Path(tmp).glob("shard_*"))
    print(json.dumps({"n": n, "baseline_mib": rss.baseline / 2**20, "growth_mib": (rss.peak - rss.baseline) / 2**20,
                      "store_mib": size / 2**20, "complete": fs.complete}))


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="extraction benchmark")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-n", type=int, default=48, help="N of the memory comparison (N vs 10 N)")
    parser.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(args)
    if opts.memory_run is not None:
        return memory_run(opts.memory_run)

    torch.manual_seed(0)
    backbone = create_backbone("sd-unet-small")
    x = torch.randn(opts.batch, 4, 32, 32)
    early = FeatureExtractor(backbone, [TAP], TIMESTEPS[:1], readout=GlobalAvg())
    full = FeatureExtractor(backbone, [TAP], TIMESTEPS[:1], readout=GlobalAvg(), early_exit=False)
    t_early, t_full = _time(lambda: early(x), opts.repeats), _time(lambda: full(x), opts.repeats)
    f_early, f_full = _flops(lambda: early(x)), _flops(lambda: full(x))

    batched = FeatureExtractor(backbone, [TAP], TIMESTEPS)
    singles = [FeatureExtractor(backbone, [TAP], [t]) for t in TIMESTEPS]
    t_batched = _time(lambda: batched(x), opts.repeats)
    t_loop = _time(lambda: [fe(x) for fe in singles], opts.repeats)
    x1 = x[:1]
    t_batched1 = _time(lambda: batched(x1), opts.repeats)
    t_loop1 = _time(lambda: [fe(x1) for fe in singles], opts.repeats)

    mem = []
    for n in (opts.memory_n, 10 * opts.memory_n):
        out = subprocess.run([sys.executable, "-m", "experiments.bench_extract", "--memory-run", str(n)],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))

    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    rows = [
        f"| early exit after `{TAP}` vs full forward with hooks (wall) | {t_full * 1e3:.0f} ms | "
        f"{t_early * 1e3:.0f} ms | {t_full / t_early:.2f}× |",
        f"| same, FLOPs counted | {f_full / 1e9:.2f} GFLOP | {f_early / 1e9:.2f} GFLOP | "
        f"{f_full / f_early:.2f}× |",
        f"| {len(TIMESTEPS)} timesteps batched vs a Python loop over t (wall) | {t_loop * 1e3:.0f} ms | "
        f"{t_batched * 1e3:.0f} ms | {t_loop / t_batched:.2f}× |",
        f"| same with batch 1 | {t_loop1 * 1e3:.0f} ms | {t_batched1 * 1e3:.0f} ms | "
        f"{t_loop1 / t_batched1:.2f}× |",
    ]
    doc = f"""# Extraction benchmark

Written by `python -m experiments.bench_extract` (`make bench`); rerun that command to reproduce. CPU,
{torch.get_num_threads()} threads, torch {torch.__version__}. Backbone: `sd-unet-small`, a
Stable-Diffusion-1.x-shaped `UNet2DConditionModel` ({params:.1f} M parameters, random init) on 32×32×4
latents, batch {opts.batch}, median of {opts.repeats} runs after a warm-up.

| comparison | baseline | difffeat | baseline / difffeat |
|---|---|---|---|
{chr(10).join(rows)}

Resident memory during a whole extraction into a feature store (per-pixel `{TAP}` features
upsampled to 32×32, 16 images per shard), each in a fresh process: growth of the RSS above its level
when the extraction starts (model loaded), sampled every 5 ms.

| images | features written to the store | RSS growth during extraction | RSS at start |
|---|---|---|---|
| {mem[0]['n']} | {mem[0]['store_mib']:.1f} MiB | {mem[0]['growth_mib']:.0f} MiB | {mem[0]['baseline_mib']:.0f} MiB |
| {mem[1]['n']} | {mem[1]['store_mib']:.1f} MiB | {mem[1]['growth_mib']:.0f} MiB | {mem[1]['baseline_mib']:.0f} MiB |

10× the images: {mem[1]['store_mib'] / mem[0]['store_mib']:.1f}× the features, \
{mem[1]['growth_mib'] / max(mem[0]['growth_mib'], 1e-9):.2f}× the memory growth: shards stream to disk, so
memory does not scale with the dataset (holding the features in RAM would add {mem[1]['store_mib']:.0f} MiB).
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_extract.md").write_text(doc)
    print(doc)
    return None


if __name__ == "__main__":
    main()
