"""Training-step overhead of DDAE++ self-conditioning, measured in one process.

For the digits U-Net and the digits DiT, one plain and one self-conditioned ``DiffusionModule`` (same
initial weights) run full training steps (forward, backward, AdamW step) on the same batches, in
alternating rounds so that drift in machine load hits both alike; the overhead is the ratio of median
step times minus one. The design target is at most 2 %.

Run: ``python -m experiments.bench_selfcond`` (writes ``experiments/results/bench_selfcond.md``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from difffeat.data import load_digits_split
from difffeat.selfcond import SelfConditioning
from difffeat.train import DiffusionModule

RESULTS = Path(__file__).resolve().parent / "results"


def _step_times(module: DiffusionModule, batches: list[torch.Tensor]) -> list[float]:
    opt = torch.optim.AdamW(module.backbone.parameters(), lr=1e-4)
    times = []
    for x in batches:
        start = time.perf_counter()
        loss, _ = module.compute_loss(x, step=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def measure(backbone: str, objective: str, rounds: int, steps: int, batch: int) -> dict[str, float]:
    images = load_digits_split("train")[0]
    gen = torch.Generator().manual_seed(0)
    plain = DiffusionModule(backbone, objective=objective)
    selfcond = DiffusionModule(backbone, objective=objective, self_conditioning=SelfConditioning(hidden=256))
    batches = [images[torch.randint(0, len(images), (batch,), generator=gen)] for _ in range(steps)]
    _step_times(plain, batches[:2]), _step_times(selfcond, batches[:2])  # warm-up
    a, b = [], []
    for _ in range(rounds):
        a += _step_times(plain, batches)
        b += _step_times(selfcond, batches)
    extra = sum(p.numel() for p in selfcond.backbone.selfcond.parameters())
    return {"plain_ms": 1e3 * statistics.median(a), "selfcond_ms": 1e3 * statistics.median(b),
            "overhead": statistics.median(b) / statistics.median(a) - 1, "params": extra,
            "base_params": sum(p.numel() for p in plain.backbone.parameters())}


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="self-conditioning overhead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    opts = parser.parse_args(args)
    torch.manual_seed(0)
    rows = []
    for backbone, objective in (("unet2d-digits", "eps"), ("dit-digits", "flow")):
        m = measure(backbone, objective, opts.rounds, opts.steps, opts.batch)
        rows.append(f"| `{backbone}` ({objective}) | {m['plain_ms']:.1f} ms | {m['selfcond_ms']:.1f} ms | "
                    f"{100 * m['overhead']:+.1f} % | {m['params'] / 1e3:.0f} k on {m['base_params'] / 1e6:.2f} M |")
    doc = f"""# Self-conditioning overhead per training step

Written by `python -m experiments.bench_selfcond`; rerun that command to reproduce. CPU,
{torch.get_num_threads()} threads, batch {opts.batch}, median of {opts.rounds} × {opts.steps} full training
steps per arm (forward, backward, AdamW), arms alternating in one process.

| backbone | plain step | self-conditioned step | overhead | extra parameters |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_selfcond.md").write_text(doc)
    print(doc)


if __name__ == "__main__":
    main()
