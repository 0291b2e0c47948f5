"""Extraction benchmark on a Stable-Diffusion-shaped U-Net (``sd-unet-small``: SD-1.x layout, 1/5 width,
32×32×4 latents), as ratios measured in one run:

* early exit after ``up_blocks.1`` vs a full forward with the same hooks (wall time), with the FLOP ratio
  of that prefix to the full network (counted by ``torch.utils.flop_counter``) as the reference;
* four timesteps batched along the batch axis vs a Python loop over them;
* bytes on disk vs the forward batch size: one small dataset extracted through ``ExtractionModule`` into
  a store per ``batch_size`` (1, 8, 32, 64 and a whole shard), each shard file compared byte for byte
  with the whole-shard store's, and the wall time per image of each of those extractions;
* peak resident memory (``ru_maxrss``, each run in a fresh process) of a whole extraction of N and 10·N
  images into a feature store with per-pixel features, and of one epoch of a linear head trained from
  that store through the streaming ``StoreDataset``: both stay flat because shards stream.

On the CPU every forward has exactly ``CPU_ROWS`` (32) rows (see ``difffeat/extract.py``): rows are chunked
and padded to it whatever ``batch_size`` says. The bytes table also runs the accelerator path on this CPU
(``batch_size`` rows per forward, unpadded) as the control that shows why.

Run: ``python -m experiments.bench_extract`` or ``make bench`` (writes ``experiments/results/bench_extract.md``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
TAP = "up_blocks.1"
TIMESTEPS = [50, 200, 400, 800]
CLASSES = 10
TRAINER = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


class RandomLatents(Dataset):
    """Seeded Gaussian latents ``(4, 32, 32)`` with a label ``i mod 10``; a stand-in dataset."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fingerprint = hashlib.sha256(f"random-latents+label:{n}".encode()).hexdigest()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        gen = torch.Generator().manual_seed(i)
        return {"image": torch.randn(4, 32, 32, generator=gen), "index": i, "label": i % CLASSES}


def _time(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _rss_now() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> dict[str, float]:
    """This process's peak resident set size in MiB, two ways: ``ru_maxrss`` (Linux: KiB) and ``VmHWM``.

    ``ru_maxrss`` survives ``exec``: a process started straight from a large parent reports at least the
    parent's RSS at the fork. :func:`_child` therefore starts children through a shell that forks them,
    and ``VmHWM`` (the high-water mark of this process image's own memory map) is read as a cross-check.
    """
    hwm = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmHWM:"))
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vmhwm_mib": hwm / 1024}


class _RssSampler:
    """Samples this process's resident set size every few milliseconds (``/proc/self/statm``)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.baseline = _rss_now()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_now())
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now())


def memory_run(n: int, store: str, shard_size: int) -> None:
    """Child process: extract ``n`` latents into ``store``; print RSS growth and peak (MiB) as JSON."""
    from difffeat.predict import ExtractionModule, extract_to_store
    from difffeat.readout import PerPixel

    module = ExtractionModule("sd-unet-small", [TAP], [200], readout=PerPixel(32), batch_size=shard_size)
    _ = module.extractor.backbone.feature_info  # the one-off probe forward, outside the measured span
    start = time.perf_counter()
    with _RssSampler() as rss:
        fs = extract_to_store(module, RandomLatents(n), store, shard_size=shard_size, trainer=TRAINER)
    wall = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(store).glob("shard_*"))
    print(json.dumps({"n": n, "baseline_mib": rss.baseline / 2**20, "growth_mib": (rss.peak - rss.baseline) / 2**20,
                      **_peak_rss(), "store_mib": size / 2**20, "complete": fs.complete,
                      "wall_s": wall}))


def train_run(store: str, keep_batch: bool = False) -> None:
    """Child process: one epoch of ``Flatten → Linear`` on the store's per-pixel feature and label, read
    by ``DataLoader(StoreDataset(...), batch_size=64)``; print the peak RSS (MiB) as JSON.

    Imports only torch and ``difffeat.store`` (no backbone, no Lightning), so the peak is the reader's.
    ``keep_batch``: keep the usual ``for batch in loader`` loop's references (the last batch and its
    autograd graph stay alive while the next batch is read), to show what they cost."""
    from torch import nn
    from torch.utils.data import DataLoader

    from difffeat.store import FeatureStore, StoreDataset

    fs = FeatureStore.open(store)
    feature = next(n for n in fs.names() if n.startswith(f"{TAP}@t"))
    loader = DataLoader(StoreDataset(fs, names=[feature, "label"]), batch_size=64)
    torch.manual_seed(0)
    head, opt, seen, losses = None, None, 0, []
    start_rss = _rss_now()
    start = time.perf_counter()
    for batch in loader:
        x, y = batch[feature], batch["label"].long()
        if head is None:
            head = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), CLASSES))
            opt = torch.optim.SGD(head.parameters(), lr=1e-3)
        loss = nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
        losses.append(loss.item())
        if not keep_batch:
            del batch, x, y, loss  # else this batch (and its autograd graph) lives on while the next one is read
    print(json.dumps({"samples": seen, "keep_batch": keep_batch, "start_mib": start_rss / 2**20, **_peak_rss(),
                      "features": feature, "in_features": head[1].in_features, "wall_s": time.perf_counter() - start,
                      "last_loss": losses[-1]}))


def _child(*args: str) -> dict:
    """Runs this module with ``args`` in a fresh process and returns the JSON it prints last.

    Started as ``sh -c 'python …; exit $?'``: the shell (small) forks the Python process, so that process's
    ``ru_maxrss`` starts from the shell's few MiB, not from this benchmark's RSS (see :func:`_peak_rss`)."""
    cmd = ["/bin/sh", "-c", '"$0" -m experiments.bench_extract "$@"; exit $?', sys.executable, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _chunks(rows: int, batch_size: int, fixed: int | None) -> list[int]:
    """Rows per forward the extractor runs for ``rows`` rows (mirrors ``FeatureExtractor.features``)."""
    chunk = fixed or batch_size
    return [fixed or min(chunk, rows - s) for s in range(0, rows, chunk)]


def _fmt_chunks(chunks: list[int]) -> str:
    parts = []
    for size in dict.fromkeys(chunks):
        count = chunks.count(size)
        parts.append(f"{count}×{size}" if count > 1 else f"{size}")
    return " + ".join(parts)


def _max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    worst = 0.0
    for name in ta:
        if name not in tb or ta[name].shape != tb[name].shape:
            return float("inf")
        if ta[name].is_floating_point():
            worst = max(worst, float((ta[name].double() - tb[name].double()).abs().max()))
        elif not torch.equal(ta[name], tb[name]):
            worst = float("inf")
    return worst


def identity_runs(n: int, shard_size: int, batch_sizes: list[int], tmp: Path, fixed_rows: bool = True
                  ) -> tuple[list[dict], int]:
    """Extracts ``RandomLatents(n)`` (all of :data:`TIMESTEPS`, raw ``TAP`` maps) once per batch size, the
    whole-shard one first; compares every shard file with the whole-shard store's and times each run.

    With ``fixed_rows=False`` the extractor runs the accelerator path on this CPU: ``batch_size`` rows
    per forward, no padding (the control).
    """
    import difffeat.extract
    from difffeat.extract import CPU_ROWS
    from difffeat.predict import ExtractionModule, extract_to_store
    from difffeat.readout import Identity

    whole = shard_size * len(TIMESTEPS)
    data = RandomLatents(n)
    # warm-up: Lightning's first Trainer and oneDNN's first kernels, outside every timed span
    warm = ExtractionModule("sd-unet-small", [TAP], TIMESTEPS[:1], readout=Identity(), batch_size=CPU_ROWS)
    extract_to_store(warm, RandomLatents(CPU_ROWS), tmp / "warm", shard_size=CPU_ROWS, trainer=TRAINER)
    shutil.rmtree(tmp / "warm")
    order = [whole, *[b for b in batch_sizes if b != whole]]
    arm = "fixed" if fixed_rows else "unpadded"
    rows, ref = [], tmp / f"{arm}{whole}"
    policy = difffeat.extract._fixed_rows
    if not fixed_rows:
        difffeat.extract._fixed_rows = lambda device: None
    try:
        rows = _identity_loop(order, data, tmp, arm, ref, whole, shard_size, CPU_ROWS if fixed_rows else None)
    finally:
        difffeat.extract._fixed_rows = policy
    return rows, whole


def _identity_loop(order: list[int], data: Dataset, tmp: Path, arm: str, ref: Path, whole: int, shard_size: int,
                   fixed: int | None) -> list[dict]:
    from difffeat.predict import ExtractionModule, extract_to_store
    from difffeat.readout import Identity

    n, rows = len(data), []
    for bs in order:
        module = ExtractionModule("sd-unet-small", [TAP], TIMESTEPS, readout=Identity(), batch_size=bs)
        _ = module.extractor.backbone.feature_info  # probe forward outside the timed span
        folder = tmp / f"{arm}{bs}"
        start = time.perf_counter()
        fs = extract_to_store(module, data, folder, shard_size=shard_size, trainer=TRAINER)
        wall = time.perf_counter() - start
        shards = []
        for k in range(fs.num_shards):
            mine, theirs = fs.shard_path(k), ref / fs.shard_path(k).name
            same = mine.read_bytes() == theirs.read_bytes()
            shards.append({"identical": same, "max_abs_diff": 0.0 if same else _max_abs_diff(mine, theirs),
                           "chunks": _chunks(len(fs.shard_range(k)) * len(TIMESTEPS), bs, fixed)})
        manifest = (folder / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
        rows.append({"batch_size": bs, "whole": bs == whole, "wall_s": wall, "ms_per_image": wall / n * 1e3,
                     "shards": shards, "manifest_identical": manifest})
        if bs != whole:
            shutil.rmtree(folder)
        del module
    return rows


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="extraction benchmark")
    parser.add_argument("--batch", type=int, default=8, help="images per call in the early-exit/timestep rows")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-n", type=int, default=64, help="N of the memory comparison (N vs 10 N)")
    parser.add_argument("--memory-shard", type=int, default=32, help="images per shard in the memory runs")
    parser.add_argument("--identity-n", type=int, default=32, help="images of the batch-size/identity runs")
    parser.add_argument("--identity-shard", type=int, default=24, help="images per shard there")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64],
                        help="ExtractionModule batch sizes compared with a whole shard (added automatically)")
    parser.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep-batch", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(args)
    if opts.memory_run is not None:
        return memory_run(opts.memory_run, opts.store, opts.memory_shard)
    if opts.train_run is not None:
        return train_run(opts.train_run, opts.keep_batch)

    from difffeat.backbones import create_backbone
    from difffeat.extract import CPU_ROWS, FeatureExtractor
    from difffeat.readout import GlobalAvg

    began = time.perf_counter()
    torch.manual_seed(0)
    backbone = create_backbone("sd-unet-small")
    x = torch.randn(opts.batch, 4, 32, 32)
    nt = len(TIMESTEPS)
    early = FeatureExtractor(backbone, [TAP], TIMESTEPS[:1], readout=GlobalAvg())
    full = FeatureExtractor(backbone, [TAP], TIMESTEPS[:1], readout=GlobalAvg(), early_exit=False)
    full(x)  # one warm-up forward through every layer: every later forward in this block has its shapes
    t_early, t_full = (_time(lambda: early(x), opts.repeats, warmup=False),
                       _time(lambda: full(x), opts.repeats, warmup=False))
    f_early, f_full = _flops(lambda: early(x)), _flops(lambda: full(x))

    # batched: every (image, timestep) row in one forward; the loop: one forward per timestep
    batched = FeatureExtractor(backbone, [TAP], TIMESTEPS, batch_size=opts.batch * nt)
    singles = [FeatureExtractor(backbone, [TAP], [t], batch_size=opts.batch) for t in TIMESTEPS]
    new_shape = False  # every CPU forward has CPU_ROWS rows: the warm-up ran that shape
    t_batched = _time(lambda: batched(x), opts.repeats, warmup=new_shape)
    t_loop = _time(lambda: [fe(x) for fe in singles], opts.repeats, warmup=False)
    x1 = x[:1]
    t_batched1 = _time(lambda: batched(x1), opts.repeats, warmup=False)
    t_loop1 = _time(lambda: [fe(x1) for fe in singles], opts.repeats, warmup=False)
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    t_section1 = time.perf_counter() - began

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmpdir:
        tmp = Path(tmpdir)
        ident, whole = identity_runs(opts.identity_n, opts.identity_shard, opts.batch_sizes, tmp)
        control, _ = identity_runs(opts.identity_n, opts.identity_shard, opts.batch_sizes, tmp, fixed_rows=False)
        mem, train, kept = [], [], []
        for n in (opts.memory_n, 10 * opts.memory_n):
            store = tmp / f"mem{n}"
            mem.append(_child("--memory-run", str(n), "--store", str(store), "--memory-shard", str(opts.memory_shard)))
            train.append(_child("--train-run", str(store)))
            kept.append(_child("--train-run", str(store), "--keep-batch"))
            shutil.rmtree(store)

    forward_rows = opts.batch
    pad = f" (on the CPU each padded to {CPU_ROWS} rows)" if forward_rows < CPU_ROWS else ""
    rows = [
        f"| early exit after `{TAP}` vs full forward with hooks (wall) | {t_full * 1e3:.0f} ms | "
        f"{t_early * 1e3:.0f} ms | {t_full / t_early:.2f}× |",
        f"| same, FLOPs counted | {f_full / 1e9:.2f} GFLOP | {f_early / 1e9:.2f} GFLOP | "
        f"{f_full / f_early:.2f}× |",
        f"| {nt} timesteps batched ({opts.batch * nt} rows, one forward) vs a Python loop over t ({nt} forwards "
        f"of {opts.batch} rows{pad}) (wall) | {t_loop * 1e3:.0f} ms | {t_batched * 1e3:.0f} ms | "
        f"{t_loop / t_batched:.2f}× |",
        f"| same with batch 1 ({nt} rows vs {nt} × 1 row, every forward padded to {CPU_ROWS} rows on the CPU) | "
        f"{t_loop1 * 1e3:.0f} ms | {t_batched1 * 1e3:.0f} ms | {t_loop1 / t_batched1:.2f}× |",
    ]

    def identity_table(runs: list[dict]) -> tuple[str, list[int]]:
        ref = next(r for r in runs if r["whole"])
        n_shards = len(ref["shards"])
        head = ("| `batch_size` | rows per forward, " + ", ".join(f"shard {k}" for k in range(n_shards))
                + " | " + " | ".join(f"shard {k} identical" for k in range(n_shards)) + " | manifest identical | "
                "max abs difference |")
        lines = [head, "|---|---|" + "---|" * n_shards + "---|---|"]
        for r in sorted(runs, key=lambda r: r["batch_size"]):
            label = f"{r['batch_size']} (whole shard)" if r["whole"] else str(r["batch_size"])
            chunks = "; ".join(_fmt_chunks(s["chunks"]) for s in r["shards"])
            same = " | ".join(("reference" if r["whole"] else ("yes" if s["identical"] else "**no**"))
                              for s in r["shards"])
            worst = max(s["max_abs_diff"] for s in r["shards"])
            lines.append(f"| {label} | {chunks} | {same} | {'yes' if r['manifest_identical'] else '**no**'} | "
                         f"{'—' if r['whole'] else f'{worst:.3g}'} |")
        differing = [r["batch_size"] for r in runs if not r["whole"] and not all(s["identical"] for s in r["shards"])]
        return "\n".join(lines), differing

    id_table, differing = identity_table(ident)
    control_table, control_differing = identity_table(control)
    id_verdict = ("Every shard file is byte-identical to the whole-shard store's." if not differing else
                  f"**Bytes differ** for batch_size {differing} (max abs difference in the table): the contract "
                  f"\"the bytes on disk never depend on the forward batch size\" does not hold here.")
    control_verdict = ("Unpadded, every shard is byte-identical too on this machine: its kernels happen to be "
                       "batch-invariant at these sizes." if not control_differing else
                       f"Unpadded, the bytes differ for batch_size {control_differing}: this CPU's kernels are not "
                       f"batch-invariant, which is why CPU forwards have a fixed row count.")
    beyond = (f" A `batch_size` of {whole} or more runs the same forwards as the whole shard here, so none is listed."
              if max(opts.batch_sizes) < whole else "")
    ref = next(r for r in ident if r["whole"])
    cref = next(r for r in control if r["whole"])
    shown = sorted(ident, key=lambda r: r["batch_size"])
    cshown = {r["batch_size"]: r for r in control}
    time_rows = [f"| {r['batch_size']}{' (whole shard)' if r['whole'] else ''} | {r['ms_per_image']:.0f} ms | "
                 f"{r['wall_s'] / ref['wall_s']:.2f}× | {cshown[r['batch_size']]['ms_per_image']:.0f} ms | "
                 f"{cshown[r['batch_size']]['wall_s'] / cref['wall_s']:.2f}× |" for r in shown]

    mem_rows = [f"| {m['n']} | {m['store_mib']:.1f} MiB | {m['peak_mib']:.0f} MiB | {m['vmhwm_mib']:.0f} MiB | "
                f"{m['growth_mib']:.0f} MiB | {m['baseline_mib']:.0f} MiB |" for m in mem]
    train_rows = [f"| {t['samples']} | {'kept (plain loop)' if t['keep_batch'] else 'freed'} | "
                  f"{t['peak_mib']:.0f} MiB | {t['vmhwm_mib']:.0f} MiB | "
                  f"{t['peak_mib'] - t['start_mib']:.0f} MiB | {t['start_mib']:.0f} MiB |" for t in [*train, *kept]]
    ext_ratio = mem[1]["peak_mib"] / mem[0]["peak_mib"]
    train_ratio = train[1]["peak_mib"] / train[0]["peak_mib"]
    kept_ratio = kept[1]["peak_mib"] / kept[0]["peak_mib"]
    ext_growth = mem[1]["growth_mib"] / max(mem[0]["growth_mib"], 1e-9)
    train_growth = ((train[1]["peak_mib"] - train[1]["start_mib"])
                    / max(train[0]["peak_mib"] - train[0]["start_mib"], 1e-9))

    def verdict(ratio: float) -> str:
        return f"goal ≤ +10 % {'met' if ratio <= 1.10 else '**not met**'}"

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown CPU")
    elapsed = time.perf_counter() - began
    doc = f"""# Extraction benchmark

Written by `python -m experiments.bench_extract` (`make bench`); rerun that command to reproduce.
Run {datetime.date.today().isoformat()} on {cpu} ({platform.machine()}), CPU, {torch.get_num_threads()} threads,
torch {torch.__version__}, {elapsed:.0f} s in all (a shared machine: wall times are noisy, ratios less so).
Backbone: `sd-unet-small`, a Stable-Diffusion-1.x-shaped `UNet2DConditionModel` ({params:.1f} M parameters,
random init) on 32×32×4 latents.

## Early exit and timestep batching

Batch {opts.batch}, median of {opts.repeats} run(s) after a warm-up forward ({t_section1:.0f} s for this table).
On the CPU every forward has exactly {CPU_ROWS} rows (`CPU_ROWS`, see `difffeat/extract.py`): a call
with fewer (image, timestep) rows is padded to {CPU_ROWS}, so the loop over t, whose forwards have
{opts.batch} and 1 rows, pays for {CPU_ROWS} rows each; on the CPU these two rows measure mostly that
padding (on a GPU no padding is done).

| comparison | baseline | difffeat | baseline / difffeat |
|---|---|---|---|
{chr(10).join(rows)}

## Bytes on disk vs `batch_size`

`RandomLatents({opts.identity_n})` extracted through `ExtractionModule(..., batch_size=b)` into one store per
`b` ({nt} timesteps {TIMESTEPS}, raw `{TAP}` maps (`Identity` readout), float32, {opts.identity_shard}
images per shard, so a whole shard is {whole} (image, timestep) rows; the short last shard has fewer). Each
shard file is compared byte for byte with the one of the store made with `batch_size={whole}`, one forward
per shard. On the CPU every forward has {CPU_ROWS} rows whatever `batch_size` says, so this first table
checks the chunking and padding, not kernels: all runs execute the same forwards.{beyond}

{id_table}

{id_verdict}

The control: the same extractions through the accelerator path (`batch_size` rows per forward, no
padding; `difffeat.extract._fixed_rows` switched off for this run), compared with its own whole-shard store.

{control_table}

{control_verdict}

## Time per image vs `batch_size`

Wall time of each of the extractions above (Lightning `predict`, store writes included; one run each after
a warm-up extraction; {nt} timesteps per image, so one image is {nt} rows), against the whole-shard run.
With fixed rows every run executes the same forwards, so their spread shows the noise of this machine; the
unpadded columns (the control above) run `batch_size` rows per forward.

| `batch_size` | fixed rows: ms per image | / whole shard | unpadded: ms per image | / whole shard |
|---|---|---|---|---|
{chr(10).join(time_rows)}

## Peak memory for 1× and 10× the images

Each run in a fresh process (`python -m experiments.bench_extract --memory-run/--train-run`, hidden flags),
peak resident set size from `resource.getrusage(RUSAGE_SELF).ru_maxrss`, with `VmHWM` from
`/proc/self/status` beside it as a cross-check. `ru_maxrss` survives `exec`, so a child started straight from
this benchmark would report at least the benchmark's own RSS (measured: a 10 MiB child of a 1.5 GiB parent
reported 1.5 GiB, and both children of a first version of this script the same peak); the children are therefore
forked by a small shell (`sh -c 'python …; exit $?'`). Per-pixel `{TAP}` features upsampled to 32×32
(256 × 32 × 32 float32, 1 MiB per image), one timestep, {opts.memory_shard} images per shard and per forward.

Extraction into the store (`extract_to_store`); growth = RSS sampled every 5 ms above its level when the
extraction starts (model loaded):

| images | features in the store | peak RSS (`ru_maxrss`) | `VmHWM` | RSS growth during extraction | RSS at start |
|---|---|---|---|---|---|
{chr(10).join(mem_rows)}

Training from the store: one epoch of `Sequential(Flatten, Linear({train[0]['in_features']}, {CLASSES}))`, SGD, on
`DataLoader(StoreDataset(store, names=["{train[0]['features']}", "label"]), batch_size=64)` (label = index mod
{CLASSES}, stored beside the features); the process imports only torch and `difffeat.store`. The loop
frees each batch (`del batch, x, y, loss`) before the next is read; the rows "kept" run the plain loop, where
the last batch and its autograd graph (which holds the input) stay alive while the next batch is read and
collated. Samples are copies, not views into their shard, so a collated batch does not keep the
shards it came from alive: the reader holds one shard beside the batch being collated.

| images | last batch while the next is read | peak RSS (`ru_maxrss`) | `VmHWM` | peak − RSS at start | RSS at start |
|---|---|---|---|---|---|
{chr(10).join(train_rows)}

10× the images ({mem[1]['store_mib'] / mem[0]['store_mib']:.1f}× the features, {mem[1]['store_mib']:.0f} MiB):
extraction peak RSS {ext_ratio:.2f}× ({verdict(ext_ratio)}), training peak RSS {train_ratio:.2f}×
({verdict(train_ratio)}; {kept_ratio:.2f}× with the plain loop, {verdict(kept_ratio)}). Holding the 10× features
in RAM instead would add {mem[1]['store_mib']:.0f} MiB. The peak ratios are diluted by the fixed RSS of an
imported torch (and, when extracting, the model); the growth alone is {ext_growth:.2f}× for extraction
({mem[0]['growth_mib']:.0f} → {mem[1]['growth_mib']:.0f} MiB) and {train_growth:.2f}× for training
({train[0]['peak_mib'] - train[0]['start_mib']:.0f} → {train[1]['peak_mib'] - train[1]['start_mib']:.0f} MiB): it
does not scale with the images (10×), but it is not constant either.
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_extract.md").write_text(doc)
    print(doc)
    return None


if __name__ == "__main__":
    main()
