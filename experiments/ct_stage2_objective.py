"""DiffusionCT stage 2: which prediction target learns the source → standard latent mapping at CPU budget.

One stage-1 autoencoder (:file:`configs/ct_stage1.yaml`, its steps) is trained once; then the stage-2 latent
DDPM of :file:`configs/ct_stage2.yaml` is trained for the same steps, batches and seed with each diffusers
prediction target (ε, v, x0 = ``sample``) and scored on the held-out test phantoms under every protocol: PSNR
(2048-HU range) of the standardized scans against the standard ones, sampled with the config's DDIM steps
**without** and **with** clipping the predicted x0 to ``[-1, 1]`` (diffusers' DDPM / DDIM default, which
unit-std latents do not fit). The stage-1 reconstruction of the standard scans and the no-op (the source
scan itself) bound the table from above and below.

Rerun: ``python -m experiments.ct_stage2_objective`` (writes ``experiments/results/ct_stage2_objective.md``;
about 8 CPU minutes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from difffeat.data.ct import CTDataModule, denormalize_hu
from difffeat.store import atomic_write
from heads.ct import CTAutoencoderModule, DiffusionCTModule
from heads.ct_metrics import psnr_ssim

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments/results"
TARGETS = ("epsilon", "v_prediction", "sample")


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0)


@torch.no_grad()
def _psnr(standardize: Any, data: CTDataModule, scan: str = "source") -> float:
    """Mean PSNR (dB) over the test pairs of ``standardize(b[scan])`` against the standard scan."""
    values = [psnr_ssim(denormalize_hu(standardize(b[scan])), b["target_hu"])[0] for b in data.test_dataloader()]
    return float(torch.cat(values).mean())


def main(argv: Sequence[str] | None = None) -> str:
    """Trains and scores every target; writes and returns the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "ct_stage2_objective.md")
    args = p.parse_args(argv)
    s1, s2 = _config("ct_stage1.yaml"), _config("ct_stage2.yaml")
    data = CTDataModule(**s2["data"]["init_args"])
    s1_steps, s2_steps = s1["trainer"]["max_steps"], s2["trainer"]["max_steps"]
    start = time.process_time()
    scores: dict[str, tuple[float, float]] = {}  # target -> (PSNR not clipped, clipped)
    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(args.seed, verbose=False)
        stage1 = CTAutoencoderModule(**{**s1["model"]["init_args"], "export_dir": f"{tmp}/stage1"})
        _trainer(s1_steps).fit(stage1, train_dataloaders=data.train_dataloader())
        stage1.eval()
        bounds = {"no-op (the source scan)": _psnr(lambda x: x, data),
                  "stage-1 reconstruction of the standard scan (upper bound)": _psnr(stage1.autoencoder, data,
                                                                                      "target")}
        init = {k: v for k, v in s2["model"]["init_args"].items() if k not in ("export_dir", "autoencoder_config")}
        for target in TARGETS:
            L.seed_everything(args.seed, verbose=False)
            module = DiffusionCTModule(**{**init, "checkpoint": f"{tmp}/stage1", "prediction_type": target,
                                          "seed": args.seed})
            _trainer(s2_steps).fit(module, train_dataloaders=data.train_dataloader())
            module.eval()
            clipped = []
            for clip in (False, True):
                module.diffusion.sampler.register_to_config(clip_sample=clip)
                clipped.append(_psnr(module.standardize, data))
            scores[target] = (clipped[0], clipped[1])
            print(target, scores[target], flush=True)
    rows = [f"| {t} | {free:.2f} | {clip:.2f} |" for t, (free, clip) in scores.items()]
    best = max(scores, key=lambda t: scores[t][0])
    text = "\n".join([
        "# DiffusionCT stage 2: prediction target at equal steps", "",
        "Rerun: `python -m experiments.ct_stage2_objective`", "",
        f"Stage 1 (`configs/ct_stage1.yaml`) {s1_steps} steps, once; stage 2 (`configs/ct_stage2.yaml`, only "
        f"`prediction_type` changed) {s2_steps} steps per target, batch {data.batch_size}, seed {args.seed}, "
        f"{s2['model']['init_args'].get('sample_steps', 20)} DDIM steps (η = 0). PSNR (dB, 2048-HU range) of the "
        f"standardized held-out test phantoms under every protocol against the standard scans. CPU minutes in all: "
        f"{(time.process_time() - start) / 60:.1f}.", "",
        *(f"- {name}: {value:.2f} dB" for name, value in bounds.items()), "",
        "| prediction target | PSNR, x0 not clipped | PSNR, x0 clipped to [-1, 1] (diffusers' default) |",
        "|---|---|---|", *rows, "",
        f"Best without clipping: **{best}**. Clipping the predicted x0 of unit-std latents to [-1, 1] changes every "
        "row: latents have no range, so the stage-2 schedulers do not clip.", ""])
    atomic_write(args.out, text.encode())
    print(text)
    return text


if __name__ == "__main__":
    main()
