"""GPU benchmark: full-size SD-2.1, SDXL, SD3-medium and Flux-shaped denoisers, random init, bf16.

For each model and resolution (512, 768, 1024 px, i.e. latents at 1/8) it taps one mid-decoder layer at
one timestep and measures, in one process:

* **difffeat**: ``FeatureExtractor`` with early exit, ``batch_size`` images per forward;
* **per-image loop** (the DIFT way of extracting, which also stops after its up block): the same
  extractor called on one image at a time;

images per second and peak GPU memory (``torch.cuda.max_memory_allocated``) for each, and the ratios.
The models are built from their published configs (written below, no download) directly on the GPU,
random init: speed and memory do not depend on the weights. Inputs are random latents (the VAE encode
is not timed: it is the same for both arms). Conditions are the adapters' zero fallbacks of the right
shapes (77 CLIP tokens for the U-Nets, 333 joint tokens for SD3, 512 T5 tokens for Flux).

Run: ``python -m experiments.bench_gpu`` on a machine with a CUDA GPU (under 8 minutes on one H200); it
writes ``experiments/results/bench_gpu.md``. Without a GPU it says so and exits 0 without writing.
``--smoke`` runs the same code on tiny registered backbones on the CPU (what the test suite does, so the
script cannot rot between GPU runs); its table is printed, never written.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SD21_UNET: dict[str, Any] = {
    "sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "upcast_attention": True,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}


@dataclass
class Model:
    """One benchmarked denoiser: its adapter (module, class), config, mid-decoder tap and VAE factor."""

    name: str
    module: str
    adapter: str
    config: dict[str, Any]
    tap: str
    latent_channels: int
    vae_factor: int = 8
    kwargs: dict[str, Any] = field(default_factory=dict)


MODELS = [
    Model("SD-2.1 U-Net", "difffeat.backbones.unet", "UNet2DConditionBackbone", SD21_UNET, "up_blocks.1", 4),
    Model("SDXL U-Net", "difffeat.backbones.sdxl", "SDXLBackbone", SDXL_UNET, "up_blocks.1", 4),
    Model("SD3-medium", "difffeat.backbones.sd3", "SD3Backbone", SD3_MEDIUM, "transformer_blocks.12", 16),
    Model("Flux-dev", "difffeat.backbones.flux", "FluxBackbone", FLUX_DEV, "transformer_blocks.9", 16),
]
#: the CPU smoke run: tiny registered backbones through the same code
SMOKE = {"SD-2.1 U-Net": ("sd-unet-tiny", "up_blocks.1"), "SDXL U-Net": ("sdxl-unet-tiny", "up_blocks.0"),
         "SD3-medium": ("sd3-tiny", "transformer_blocks.0"), "Flux-dev": ("flux-tiny", "transformer_blocks.0")}


def build(model: Model, device: torch.device, dtype: torch.dtype, latent: int, smoke: bool) -> Any:
    """The adapter on ``device`` in ``dtype``, its parameters initialised there (no CPU round trip)."""
    import importlib

    from difffeat.backbones import create_backbone

    if smoke:
        return create_backbone(SMOKE[model.name][0])
    cls = getattr(importlib.import_module(model.module), model.adapter)
    config, kwargs = dict(model.config), dict(model.kwargs)
    if "sample_size" in config:
        config["sample_size"] = latent
    else:  # Flux: no sample size in its config; the adapter takes the latent size (and resolves its shift)
        kwargs["latent_size"] = latent
    with torch.device(device):
        backbone = cls.from_config(config, **kwargs)
    return backbone.to(dtype)


def _timed(fn: Any, device: torch.device) -> tuple[float, float]:
    """``(seconds, peak MiB)`` of ``fn()`` after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
    return time.perf_counter() - start, float("nan")


def measure(model: Model, px: int, n: int, batch_size: int, device: torch.device, dtype: torch.dtype,
            smoke: bool) -> dict[str, Any]:
    """Images/s and peak memory of the batched extractor and of the per-image loop for one model and size."""
    from difffeat.extract import FeatureExtractor
    from difffeat.readout import GlobalAvg

    latent = px // model.vae_factor
    backbone = build(model, device, dtype, latent, smoke)
    tap = SMOKE[model.name][1] if smoke else model.tap
    size = backbone.latent_size
    x = torch.randn(n, backbone.latent_channels, size, size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype)
    fe = FeatureExtractor(backbone, [tap], [261], readout=GlobalAvg(), batch_size=batch_size)
    t_batched, m_batched = _timed(lambda: fe(x, range(n)), device)
    t_loop, m_loop = _timed(lambda: [fe(x[i:i + 1], [i]) for i in range(n)], device)
    params = sum(p.numel() for p in backbone.parameters()) / 1e9
    return {"model": model.name, "px": px, "latent": size, "tap": tap, "params_b": params, "n": n,
            "batch_size": batch_size, "ips_batched": n / t_batched, "ips_loop": n / t_loop,
            "mem_batched": m_batched, "mem_loop": m_loop}


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`measure` rows."""
    lines = ["| model | px (latent) | tap | params | difffeat img/s (batch) | loop img/s | speed-up | "
             "difffeat peak MiB | loop peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['px']} ({r['latent']}) | `{r['tap']}` | {r['params_b']:.2f} B | "
                     f"{r['ips_batched']:.1f} ({r['batch_size']}) | {r['ips_loop']:.1f} | "
                     f"{r['ips_batched'] / r['ips_loop']:.2f}× | {r['mem_batched']:.0f} | {r['mem_loop']:.0f} |")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> str | None:
    """Runs the benchmark (see the module docstring); returns the table, or ``None`` when it skipped."""
    parser = argparse.ArgumentParser(description="GPU extraction benchmark")
    parser.add_argument("--smoke", action="store_true", help="tiny backbones on the CPU; print only")
    parser.add_argument("--n", type=int, default=16, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--models", nargs="+", default=[m.name for m in MODELS])
    opts = parser.parse_args(args)
    if not opts.smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine, skipped (nothing written); run it on a GPU machine, "
              "or pass --smoke for the CPU code check")
        return None
    device = torch.device("cpu" if opts.smoke else "cuda")
    dtype = torch.float32 if opts.smoke else torch.bfloat16
    began, rows = time.perf_counter(), []
    sizes = opts.sizes[:1] if opts.smoke else opts.sizes
    for model in (m for m in MODELS if m.name in opts.models):
        for px in sizes:
            rows.append(measure(model, px, opts.n, opts.batch_size, device, dtype, opts.smoke))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model of this row is gone with measure's frame
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = table(rows)
    if opts.smoke:
        print(out)
        return out
    gpu = torch.cuda.get_device_name()
    doc = f"""# GPU extraction benchmark

Written by `python -m experiments.bench_gpu`; rerun that command on a CUDA machine to reproduce.
Run {datetime.date.today().isoformat()} on {gpu}, torch {torch.__version__}, bf16, {time.perf_counter() - began:.0f} s
in all ({platform.machine()}). Random-init denoisers built from their published configs, one timestep (261),
a mid-decoder tap with early exit, global-average readout, {opts.n} random latents per row; the loop calls
the same extractor once per image. Peak memory is `torch.cuda.max_memory_allocated` over the timed call
(weights included).

{out}
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_gpu.md").write_text(doc)
    print(doc)
    return out


if __name__ == "__main__":
    main()
