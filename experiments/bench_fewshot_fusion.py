"""What KV fusion at the U-Net's 1/2-resolution grid costs on the CPU (few-shot segmentation, DiffewS).

Two pixel-space scene U-Nets of the same widths, in one process: ``sd-unet-scenes`` (attention at 1/4 and
1/8 of the scene's side) and ``sd-unet-scenes-attn2`` (also at 1/2: every level but the input level, as
SD has). For each, :class:`heads.fewshot_diffews.DiffewS` with KV fusion in every self-attention, a batch
of ``--episodes`` episodes, 1 and 5 shots, 64- and 32-px scenes: the wall time of one training step
(forward, ``mask_loss``, backward) and of one prediction (no gradients), median of ``--repeats`` after a
warm-up, and the keys each query token of the finest fused attention sees. Random init: the cost does not
depend on the weights.

Run: ``python -m experiments.bench_fewshot_fusion`` (writes ``experiments/results/bench_fewshot_fusion.md``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONES = ("sd-unet-scenes", "sd-unet-scenes-attn2")


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _finest_fused_tokens(model, size: int) -> int:
    """Query tokens of the finest self-attention (the largest grid KV fusion acts on)."""
    from diffusers.models.attention_processor import Attention

    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
             for name, m in model.backbone.model.named_modules() if isinstance(m, Attention) and name.endswith("attn1")]
    try:
        with torch.no_grad():
            model.backbone(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return max(seen)


def measure(backbone: str, shots: int, episodes: int, repeats: int, size: int = 64) -> dict:
    """Training-step and prediction wall time of DiffewS on ``backbone`` for ``shots``-shot episodes."""
    from heads.fewshot_diffews import DiffewS, mask_loss

    torch.manual_seed(0)
    model = DiffewS(backbone)
    gen = torch.Generator().manual_seed(0)
    support = torch.rand(episodes, shots, 3, size, size, generator=gen) * 2 - 1
    support_mask = torch.zeros(episodes, shots, size, size, dtype=torch.bool)
    support_mask[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    query = torch.rand(episodes, 3, size, size, generator=gen) * 2 - 1
    target = torch.zeros(episodes, size, size, dtype=torch.bool)
    target[:, 5 * size // 16:11 * size // 16, 5 * size // 16:11 * size // 16] = True

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        mask_loss(model(support, support_mask, query), target).backward()

    def predict() -> None:
        with torch.no_grad():
            model.predict(support, support_mask, query)

    tokens = _finest_fused_tokens(model, size)
    return {"backbone": backbone, "shots": shots, "size": size, "train_s": _median_s(train_step, repeats),
            "predict_s": _median_s(predict, repeats), "tokens": tokens, "keys": tokens * (1 + shots)}


def main(args: list[str] | None = None) -> str:
    """Runs the comparison and writes the results file; returns its text."""
    parser = argparse.ArgumentParser(description="cost of KV fusion at 1/2 resolution on the CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per batch (the benchmark trains on 8)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 32], help="scene sides")
    parser.add_argument("--out", default=str(RESULTS / "bench_fewshot_fusion.md"))
    opts = parser.parse_args(args)
    began = time.perf_counter()
    rows = {(b, k, n): measure(b, k, opts.episodes, opts.repeats, n) for n in opts.sizes for k in opts.shots
            for b in BACKBONES}
    lines = ["| scene | shots | U-Net | finest fused grid (query tokens) | keys per query token | training step | "
             "prediction | training / baseline | prediction / baseline | training / attn2 at the first size |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in opts.sizes:
        for k in opts.shots:
            base = rows[(BACKBONES[0], k, n)]
            first = rows[(BACKBONES[1], k, opts.sizes[0])]
            for b in BACKBONES:
                r = rows[(b, k, n)]
                side = int(r["tokens"] ** 0.5)
                lines.append(f"| {n}×{n} | {k} | `{b}` | {side}×{side} ({r['tokens']}) | {r['keys']} | "
                             f"{r['train_s'] * 1e3:.0f} ms | {r['predict_s'] * 1e3:.0f} ms | "
                             f"{r['train_s'] / base['train_s']:.2f}× | {r['predict_s'] / base['predict_s']:.2f}× | "
                             f"{r['train_s'] / first['train_s']:.2f}× |")
    doc = f"""# KV fusion at 1/2 resolution: CPU cost

Written by `python -m experiments.bench_fewshot_fusion`; rerun that command to reproduce.
Run {datetime.date.today().isoformat()} on {platform.processor() or platform.machine()}, CPU,
{torch.get_num_threads()} threads, torch {torch.__version__}, {time.perf_counter() - began:.0f} s in all (a shared
machine: wall times are noisy, ratios less so). DiffewS (`heads/fewshot_diffews.py`), random init, a batch of
{opts.episodes} episodes, median of {opts.repeats} after a warm-up; "baseline" is `{BACKBONES[0]}` at the same
scene size and shots, measured in the same run; the last column compares with `{BACKBONES[1]}` at
{opts.sizes[0]}×{opts.sizes[0]} (what the few-shot benchmark's choice of scene size saves).

{chr(10).join(lines)}
"""
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    print(doc)
    return doc


if __name__ == "__main__":
    main()
