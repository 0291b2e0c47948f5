"""Miniature reproduction of representation autoencoders (RAE) on digits.

The frozen encoder is an MAE-config ``AutoencoderRAE`` encoder (width 128, patch 2, 2 layers) trained here
once with the MAE objective on the digits training split, without labels; its latent is ``128 × 8 × 8``
(``m = 8192``), so the dimension-dependent shift is ``α = √(8192 / 4096) = √2``, not 1. Per seed:

(a) decoders trained with noise augmentation ``τ = 0.8`` and without (``τ = 0``), same steps: PSNR of test
    reconstructions from clean latents and from latents with added noise ``σ ∈ {0.2, 0.5}``; and FD-digits
    of the same DiT^DH samples decoded by either decoder (the paper's point: the augmented decoder
    reconstructs slightly worse but decodes generated latents better);
(b) in RAE latent space, the DiT with the wide DDT head (DiT^DH, 1.50 M parameters) vs a plain narrow DiT of
    the same width and parameter count (7 blocks), at equal steps; and DiT^DH with the shift switched off
    (``α`` forced to 1), at equal steps;
(c) at equal training time (steps set from each arm's measured time per step): DiT^DH in RAE latent space,
    the same DiT^DH in pixel space, and the landed VAE-free baseline (the pixel SiT, ``dit-digits``,
    ``configs/sit_digits.yaml``); FD-digits of 540 decoded samples (Euler, 25 steps, shifted grid for the
    latent arms);
(d) linear-probe (shrinkage LDA) test accuracy, 10 labels per class and all labels: RAE latent and encoder
    layers (t = 0, the clean image) vs the pixel-space SiT of (c) (token-mean taps of blocks 2, 4, 6 at
    t = 100 and 300, as ``repro_training``) and, when ``make run`` has trained it, the main job's U-Net.

Run: ``python -m experiments.repro_rae`` (``--smoke`` for a minutes-long check of every path, written to
``repro_rae_smoke.md``). Trained runs are kept under ``.cache/difffeat/repro_rae`` and reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from difffeat.backbones import create_backbone
from difffeat.cli import main as difffeat
from difffeat.data import DigitsDataset, load_digits_split
from difffeat.extract import FeatureExtractor, feature_name
from difffeat.metrics import fd_digits, load_fd_network
from difffeat.rae import (
    RAE,
    digits_autoencoder,
    pretrain_mae_encoder,
    sample_latents,
    shift_alpha,
    train_decoder,
)
from difffeat.readout import AdaptiveKxK, GlobalAvg, TokenMean
from difffeat.sample import sample
from difffeat.store import atomic_write
from heads.classification import format_cell, probe_sweep, select_by_validation, standardise

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / ".cache/difffeat/repro_rae"
RESULTS = ROOT / "experiments/results"
UNET = ROOT / ".cache/difffeat/backbones/unet2d-digits"
TAUS = (0.8, 0.0)
SIGMAS = (0.0, 0.2, 0.5)
SIT_TAPS = ["transformer_blocks.1", "transformer_blocks.3", "transformer_blocks.5"]
#: latent-space arms: (config, extra CLI arguments)
LATENT_ARMS = {
    "DiT^DH (latent)": [],
    "narrow DiT (latent)": ["--model.backbone", "dit-dh-digits-narrow"],
    "DiT^DH (latent, no shift)": ["--model.scheduler", json.dumps({"shift": 1.0})],
}
PIXEL_ARMS = {"DiT^DH (pixel)": ("rae_dit_dh_pixel_digits", "dit-dh-digits-pixel", (1, 16, 16)),
              "SiT (pixel, landed)": ("sit_digits", "dit-digits", (1, 16, 16))}


def _log(msg: str) -> None:
    print(f"[repro_rae {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_encoder(runs: Path, steps: int, batch: int) -> Path:
    """The MAE encoder with latent statistics (seed 0, shared by all seeds: the frozen encoder is a given)."""
    folder = runs / f"encoder-mae{steps}"
    if (folder / "config.json").exists():
        return folder
    train = load_digits_split("train")[0]
    rae = RAE(digits_autoencoder(seed=0), image_channels=1)
    pretrain_mae_encoder(rae.autoencoder, train, steps=steps, batch_size=batch, seed=0, progress=True)
    rae.fit_latent_stats(train)
    rae.save_pretrained(folder)
    return folder


def build_decoder(encoder: Path, raw: torch.Tensor, tau: float, seed: int, steps: int, batch: int,
                  runs: Path) -> Path:
    """A decoder trained with noise augmentation ``tau`` (reused when saved)."""
    folder = runs / f"decoder-tau{tau}-{steps}steps-seed{seed}"
    if (folder / "config.json").exists():
        return folder
    rae = RAE.from_pretrained(encoder)
    with torch.random.fork_rng(devices=[]):  # the decoder's fresh init is seeded by the run's seed
        torch.manual_seed(seed)
        for m in rae.autoencoder.decoder.modules():
            if hasattr(m, "reset_parameters") and m is not rae.autoencoder.decoder:
                m.reset_parameters()
    train_decoder(rae, load_digits_split("train")[0], steps=steps, batch_size=batch, noise_tau=tau, seed=seed,
                  progress=True, raw=raw)
    rae.save_pretrained(folder)
    return folder


@torch.no_grad()
def reconstruction_psnr(decoder: Path, raw_test: torch.Tensor, test: torch.Tensor) -> dict[float, float]:
    """PSNR (dB, images in [-1, 1], data range 2) of test reconstructions from latents with noise σ added."""
    rae = RAE.from_pretrained(decoder)
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for sigma in SIGMAS:
        z = raw_test + sigma * torch.randn(raw_test.shape, generator=gen)
        rec = torch.cat([rae.decode(rae.normalize(z[i:i + 128])) for i in range(0, len(z), 128)]).clamp(-1, 1)
        out[sigma] = float(peak_signal_noise_ratio(rec, test, data_range=2.0))
    return out


def fit(config: str, out: Path, seed: int, steps: int, batch: int, extra: list[str]) -> tuple[Path, float]:
    """Trains one denoiser through ``difffeat fit`` (reused when exported); returns it and its training seconds."""
    timing = out.with_name(out.name + ".json")
    if (out / "model_index.json").exists() and timing.exists():
        return out, json.loads(timing.read_text())["seconds"]
    tick = time.time()
    difffeat(["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--seed_everything", str(seed),
              "--model.backbone_kwargs", json.dumps({"seed": seed}), "--model.export_dir", str(out),
              "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
              "--model.warmup_steps", str(min(50, max(steps // 10, 1))), "--data.batch_size", str(batch), *extra])
    seconds = time.time() - tick
    timing.write_text(json.dumps({"seconds": seconds, "steps": steps}))
    return out, seconds


def step_costs(runs: Path, batch: int) -> dict[str, float]:
    """Seconds per training step of the equal-time arms, measured once per ``runs`` folder and batch and kept.

    The equal-time step counts (and so the runs' folder names) follow from these; measuring them again in a
    later process, on a differently loaded machine, would change the counts and retrain every pixel arm.
    """
    kept = runs / f"step-seconds-batch{batch}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    costs = {"DiT^DH (latent)": step_seconds("dit-dh-digits", (128, 8, 8), batch)}
    for arm, (_, name, shape) in PIXEL_ARMS.items():
        costs[arm] = step_seconds(name, shape, batch)
    atomic_write(kept, json.dumps(costs).encode())
    return costs


def step_seconds(backbone: str, shape: tuple[int, int, int], batch: int, reps: int = 3) -> float:
    """Measured seconds of one training step (forward, backward, AdamW) of a registered denoiser."""
    b = create_backbone(backbone).train()
    opt = torch.optim.AdamW(b.parameters())
    x, t = torch.randn(batch, *shape), torch.full((batch,), 500.0)
    times = []
    for i in range(reps + 1):
        tick = time.time()
        b(x, t).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.time() - tick)
    return float(np.median(times))


@torch.no_grad()
def generation_fd(folder: Path, n: int, steps: int, fd_net: torch.nn.Module,
                  other_decoder: Path | None = None) -> dict[str, float]:
    """FD-digits of ``n`` samples; latent pipelines decode through their RAE (and ``other_decoder``).

    Sampling is seeded, so the numbers are kept beside the run (``<run>.fd-<n>-<steps>[-<decoder>].json``) and
    reused: seeds trained by separate processes are assembled into one report without sampling again.
    """
    kept = folder.with_name(f"{folder.name}.fd-{n}-{steps}" + (f"-{other_decoder.name}" if other_decoder else "")
                            + ".json")
    if kept.exists():
        return json.loads(kept.read_text())
    backbone = create_backbone(folder)
    if getattr(backbone, "rae", None) is None:
        out = {"fd": fd_digits(sample(backbone, n, steps=steps, seed=0), net=fd_net)}
    else:
        z = sample_latents(backbone, n, steps=steps, seed=0)
        out = {"fd": fd_digits(backbone.decode(z).clamp(-1, 1), net=fd_net)}
        if other_decoder is not None:
            out["fd_other_decoder"] = fd_digits(RAE.from_pretrained(other_decoder).decode(z).clamp(-1, 1),
                                                net=fd_net)
    atomic_write(kept, json.dumps(out).encode())
    return out


@torch.no_grad()
def probe(backbone: Any, taps: list[str], timesteps: list[int], readout: Any, seeds: list[int],
          data: DigitsDataset) -> dict[str, Any]:
    """LDA probe accuracies (10 / class and all labels) of the validated best tap, and every tap's."""
    extractor = FeatureExtractor(backbone, taps, timesteps, readout=readout)
    parts = [extractor(data.images[i:i + 256], range(i, min(i + 256, len(data)))) for i in range(0, len(data), 256)]
    split = (torch.arange(len(data)) >= data.num_train).long()
    feats, labels, train_mask = standardise({**{feature_name(k): torch.cat([p[k] for p in parts]) for k in parts[0]},
                                             "split": split, "label": data.labels})
    acc = probe_sweep(feats, labels, train_mask, (10, 0), seeds)
    out: dict[str, Any] = {"per_tap": {k: {r: float(np.mean(v)) for r, v in a.items()} for k, a in acc.items()}}
    for regime in (10, 0):
        chosen, _ = select_by_validation(feats, labels, train_mask, regime, seeds)
        out[f"acc{regime}"], out[f"tap{regime}"] = acc[chosen][regime], chosen
    return out


def _ms(values: list[float], digits: int = 2) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f}" if len(v) == 1 else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def _spread(a: list[float], b: list[float]) -> str:
    """Whether two arms' means differ by more than the sum of their seed standard deviations, in words."""
    if min(len(a), len(b)) < 2:
        return " (one seed: no spread to judge the difference by)."
    beyond = abs(np.mean(a) - np.mean(b)) > np.std(a) + np.std(b)
    return " (beyond the seed spread)." if beyond else " (within the seed spread)."


def plot(rec: dict[float, dict[float, list[float]]], fds: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    for tau, per_sigma in rec.items():
        sig = sorted(per_sigma)
        axes[0].errorbar(sig, [np.mean(per_sigma[s]) for s in sig], [np.std(per_sigma[s]) for s in sig],
                         marker="o", label=f"decoder τ = {tau}")
    axes[0].set(xlabel="noise σ added to the test latents", ylabel="PSNR (dB)", title="(a) reconstruction")
    axes[0].legend()
    names = list(fds)
    axes[1].bar(range(len(names)), [np.mean(fds[n]) for n in names], yerr=[np.std(fds[n]) for n in names])
    axes[1].set_xticks(range(len(names)), names, rotation=25, ha="right")
    axes[1].set(ylabel="FD-digits (lower is better)", title="(b, c) generation")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mae-steps", type=int, default=600)
    parser.add_argument("--mae-batch", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=1000)
    parser.add_argument("--dit-steps", type=int, default=400, help="steps of the latent arms (equal-step budget)")
    parser.add_argument("--batch", type=int, default=32, help="batch of decoder and DiT training")
    parser.add_argument("--samples", type=int, default=540)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything, seed 0, own output file")
    parser.add_argument("--runs", default=str(RUNS))
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args(args)
    if opts.smoke:
        opts.seeds, opts.mae_steps, opts.decoder_steps, opts.dit_steps = [0], 3, 3, 2
        opts.samples, opts.sample_steps, opts.runs = 100, 2, str(Path(opts.runs) / "smoke")
    runs = Path(opts.runs)
    runs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    timings: dict[str, float] = {}
    fd_net = load_fd_network()
    train, test = load_digits_split("train")[0], load_digits_split("test")[0]

    tick = time.time()
    encoder = build_encoder(runs, opts.mae_steps, opts.mae_batch)
    enc_rae = RAE.from_pretrained(encoder)
    raw_train, raw_test = enc_rae.raw_latents(train), enc_rae.raw_latents(test)
    timings["encoder (MAE) + latents"] = time.time() - tick
    alpha = shift_alpha(enc_rae.latent_shape)
    _log(f"encoder ready, latent {enc_rae.latent_shape}, alpha {alpha:.3f}")

    # step costs for the equal-time comparison
    t_step = step_costs(runs, opts.batch)
    budget = opts.dit_steps * t_step["DiT^DH (latent)"]
    pixel_steps = {arm: max(1, round(budget / t_step[arm])) for arm in PIXEL_ARMS}

    rec: dict[float, dict[float, list[float]]] = {tau: {s: [] for s in SIGMAS} for tau in TAUS}
    gen: dict[str, list[float]] = {}
    fd_tau0: list[float] = []
    train_seconds: dict[str, list[float]] = {}
    probes: dict[str, list[dict[str, Any]]] = {}
    data = DigitsDataset("all")
    for seed in opts.seeds:
        tick = time.time()
        decoders = {tau: build_decoder(encoder, raw_train, tau, seed, opts.decoder_steps, opts.batch, runs)
                    for tau in TAUS}
        for tau, folder in decoders.items():
            for sigma, value in reconstruction_psnr(folder, raw_test, test).items():
                rec[tau][sigma].append(value)
        timings["decoders"] = timings.get("decoders", 0.0) + time.time() - tick
        _log(f"seed {seed}: decoders done")
        for arm, extra in LATENT_ARMS.items():
            slug = arm.replace(" ", "_").replace("^", "").replace("(", "").replace(")", "").replace(",", "")
            folder, secs = fit("rae_dit_dh_digits", runs / f"{slug}-{opts.dit_steps}steps-seed{seed}", seed,
                               opts.dit_steps, opts.batch, ["--model.checkpoint", str(decoders[0.8]),
                                                            "--data.checkpoint", str(encoder), *extra])
            train_seconds.setdefault(arm, []).append(secs)
            tick = time.time()
            res = generation_fd(folder, opts.samples, opts.sample_steps, fd_net,
                                decoders[0.0] if arm == "DiT^DH (latent)" else None)
            timings["sampling + FD"] = timings.get("sampling + FD", 0.0) + time.time() - tick
            gen.setdefault(arm, []).append(res["fd"])
            if "fd_other_decoder" in res:
                fd_tau0.append(res["fd_other_decoder"])
            _log(f"seed {seed}: {arm} FD {res['fd']:.2f} ({secs:.0f} s training)")
        for arm, (config, _, _) in PIXEL_ARMS.items():
            slug = arm.replace(" ", "_").replace("^", "").replace("(", "").replace(")", "").replace(",", "")
            folder, secs = fit(config, runs / f"{slug}-{pixel_steps[arm]}steps-seed{seed}", seed, pixel_steps[arm],
                               opts.batch, [])
            train_seconds.setdefault(arm, []).append(secs)
            tick = time.time()
            gen.setdefault(arm, []).append(generation_fd(folder, opts.samples, opts.sample_steps, fd_net)["fd"])
            timings["sampling + FD"] = timings.get("sampling + FD", 0.0) + time.time() - tick
            _log(f"seed {seed}: {arm} FD {gen[arm][-1]:.2f} ({secs:.0f} s training)")
            if arm == "SiT (pixel, landed)":
                tick = time.time()
                probes.setdefault("pixel SiT (c), token mean", []).append(
                    probe(create_backbone(folder), SIT_TAPS, [100, 300], TokenMean(), opts.seeds, data))
                timings["probes"] = timings.get("probes", 0.0) + time.time() - tick

    # (d) the frozen encoder is seed-independent: probed once, label-subset seeds vary
    tick = time.time()
    enc_backbone = create_backbone(encoder)
    layers = enc_backbone.tap_names()
    probes["RAE latent + encoder layers, global average"] = [probe(enc_backbone, layers, [0], GlobalAvg(),
                                                                   opts.seeds, data)]
    probes["RAE latent, 2×2 average"] = [probe(enc_backbone, ["latent"], [0], AdaptiveKxK(2), opts.seeds, data)]
    if (UNET / "model_index.json").exists():
        probes["main job's U-Net (make run), 4×4 average"] = [
            probe(create_backbone(UNET), ["down_blocks.2", "mid_block", "up_blocks.0"], [10, 50, 100],
                  AdaptiveKxK(4), opts.seeds, data)]
    timings["probes"] = timings.get("probes", 0.0) + time.time() - tick
    total = time.time() - start
    write_report(opts, alpha, rec, gen, fd_tau0, train_seconds, t_step, pixel_steps, probes, timings, total)


def write_report(opts: argparse.Namespace, alpha: float, rec: dict, gen: dict, fd_tau0: list[float],
                 train_seconds: dict, t_step: dict, pixel_steps: dict, probes: dict, timings: dict,
                 total: float) -> None:
    """Writes the markdown table and the plot, from the measured numbers only."""
    results = Path(opts.out)
    results.mkdir(parents=True, exist_ok=True)
    stem = "repro_rae_smoke" if opts.smoke else "repro_rae"
    fds = {**gen, "DiT^DH (latent), τ = 0 decoder": fd_tau0}
    plot(rec, fds, results / f"{stem}.png")
    cmd = "python -m experiments.repro_rae" + (" --smoke" if opts.smoke else "")
    a_rows = ["| decoder | " + " | ".join(f"PSNR σ = {s} (dB)" for s in SIGMAS) + " | FD-digits of DiT^DH samples |",
              "|---|" + "---|" * (len(SIGMAS) + 1)]
    for tau in TAUS:
        fd = gen["DiT^DH (latent)"] if tau == 0.8 else fd_tau0
        a_rows.append(f"| τ = {tau} | " + " | ".join(_ms(rec[tau][s]) for s in SIGMAS) + f" | {_ms(fd)} |")
    b_rows = ["| arm | FD-digits ↓ | training s / run |", "|---|---|---|"]
    for arm in LATENT_ARMS:
        b_rows.append(f"| {arm} | {_ms(gen[arm])} | {_ms(train_seconds[arm], 0)} |")
    c_rows = ["| arm | steps | s / step | training s / run | FD-digits ↓ |", "|---|---|---|---|---|"]
    c_rows.append(f"| DiT^DH (latent) | {opts.dit_steps} | {t_step['DiT^DH (latent)']:.2f} | "
                  f"{_ms(train_seconds['DiT^DH (latent)'], 0)} | {_ms(gen['DiT^DH (latent)'])} |")
    for arm in PIXEL_ARMS:
        c_rows.append(f"| {arm} | {pixel_steps[arm]} | {t_step[arm]:.2f} | {_ms(train_seconds[arm], 0)} | "
                      f"{_ms(gen[arm])} |")
    d_rows = ["| features | 10 labels / class (%) | all labels (%) | chosen tap (10 / all) |", "|---|---|---|---|"]
    for name, runs in probes.items():
        acc10 = [float(np.mean(r["acc10"])) for r in runs] if len(runs) > 1 else runs[0]["acc10"]
        acc0 = [float(np.mean(r["acc0"])) for r in runs] if len(runs) > 1 else runs[0]["acc0"]
        d_rows.append(f"| {name} | {format_cell(acc10)} | {format_cell(acc0)} | {runs[0]['tap10']} / "
                      f"{runs[0]['tap0']} |")
    if not (UNET / "model_index.json").exists():
        d_rows.append("| main job's U-Net | not measured: its checkpoint (`make run`) is not in the cache | | |")

    dh, narrow, noshift = gen["DiT^DH (latent)"], gen["narrow DiT (latent)"], gen["DiT^DH (latent, no shift)"]
    verdicts = [
        f"* (a) noise augmentation: PSNR on clean latents τ=0.8 {_ms(rec[0.8][0.0])} vs τ=0 {_ms(rec[0.0][0.0])} dB; "
        f"at σ=0.5 {_ms(rec[0.8][0.5])} vs {_ms(rec[0.0][0.5])} dB; FD of the same DiT^DH samples "
        f"{_ms(dh)} (τ=0.8) vs {_ms(fd_tau0)} (τ=0): "
        + ("the augmented decoder decodes generated latents better" if np.mean(dh) < np.mean(fd_tau0)
           else "the augmented decoder does not decode generated latents better here")
        + _spread(dh, fd_tau0),
        f"* (b) wide head: DiT^DH {_ms(dh)} vs narrow DiT {_ms(narrow)} FD-digits at equal steps and parameters: "
        + ("DiT^DH better" if np.mean(dh) < np.mean(narrow) else "DiT^DH not better")
        + _spread(dh, narrow),
        f"* (b) shift α = {alpha:.3f}: with it {_ms(dh)}, without (α = 1) {_ms(noshift)}: "
        + ("the shift helps" if np.mean(dh) < np.mean(noshift) else "the shift does not help")
        + _spread(dh, noshift),
        f"* (c) equal training time: RAE latent {_ms(dh)} vs pixel DiT^DH {_ms(gen['DiT^DH (pixel)'])} vs landed "
        f"pixel SiT {_ms(gen['SiT (pixel, landed)'])} FD-digits: "
        + ("the RAE latent space generates better than both pixel-space arms"
           if np.mean(dh) < min(np.mean(gen["DiT^DH (pixel)"]), np.mean(gen["SiT (pixel, landed)"]))
           else "the RAE latent space does not generate better than pixel space here")
        + _spread(dh, gen["DiT^DH (pixel)"]),
    ]
    best = max(probes, key=lambda name: float(np.mean([np.mean(r["acc10"]) for r in probes[name]])))
    verdicts.append(f"* (d) linear probes, 10 labels per class: the best features are {best}"
                    + ("" if best.startswith("RAE") else "; the RAE latent does not probe best here") + ".")
    cost = "\n".join(f"| {k} | {v / 60:.1f} |" for k, v in timings.items())
    doc = f"""# Representation autoencoders (RAE) on digits{" — smoke run (a few steps; numbers mean nothing)"
                                                         if opts.smoke else ""}

Written by `{cmd}` (rerun it to reproduce; seeds {opts.seeds}; MAE encoder {opts.mae_steps} steps of
batch {opts.mae_batch}, trained once with seed 0 and shared; decoders {opts.decoder_steps} steps, DiTs
{opts.dit_steps} steps (latent arms), batch {opts.batch}; {opts.samples} samples, {opts.sample_steps} Euler
steps; EMA weights). Mean ± std over training seeds. Runs found in `--runs` are reused, not retrained;
their training seconds are the ones recorded when they were trained, and the phase times below exclude them.

Encoder: MAE-config `AutoencoderRAE` (width 128, patch 2, 2 layers, final LayerNorm without affine), MAE
objective on the 1,257 training digits without labels. Latent `128 × 8 × 8`, per-element normalisation,
`m = 8192`, shift `α = √(m / 4096) = {alpha:.3f}` (at width 64, `m = n` and the shift would be 1).

## (a) Noise-augmented decoding

{chr(10).join(a_rows)}

## (b) Wide DDT head and the shift, RAE latent space, equal steps

DiT^DH: 4 blocks of width 96 and a 1-block head of width 192 (wider than the 128 latent channels), 1.50 M
parameters; narrow DiT: width 96, 7 blocks, no head, 1.50 M parameters.

{chr(10).join(b_rows)}

## (c) Latent vs pixel space, equal training time

Steps of the pixel arms are set so that steps × measured s / step equals the latent arm's budget. The RAE
arm's one-off costs (encoder pretraining, encoding the training set, the decoder) are not in its budget.

{chr(10).join(c_rows)}

## (d) Linear probes

{chr(10).join(d_rows)}

## What the numbers say

{chr(10).join(verdicts)}

Limits of the miniature: a 2-layer MAE on 1,257 digits is no DINOv2, so the RAE latent carries far less
semantics than the paper's; FD-digits is a digits-classifier Fréchet distance, not FID; decoders train
with L1 only (no LPIPS / GAN weights offline); the DiTs are 1.5 M parameters trained for minutes, so the
wide-head and shift effects the paper reports at DiT-XL scale may not show, and differences within the
seed spread say nothing either way.

![curves]({stem}.png)

| phase | minutes |
|---|---|
{cost}

This invocation: {total / 60:.1f} min on this machine; the training runs it reports took
{sum(sum(v) for v in train_seconds.values()) / 60:.1f} min in all when they were trained (recorded with each run).
"""
    (results / f"{stem}.md").write_text(doc)
    if not opts.smoke and results == RESULTS:  # the reported study also fills the README's summary
        from experiments.probe_digits import write_readme_table

        fd_rows = ["| arm (FD-digits of decoded samples) | FD-digits ↓ |", "|---|---|"]
        fd_rows += [f"| {arm} | {_ms(v)} |" for arm, v in fds.items()]
        psnr = (f"Reconstruction PSNR from clean latents: τ = 0.8 decoder {_ms(rec[0.8][0.0])} dB, τ = 0 decoder "
                f"{_ms(rec[0.0][0.0])} dB; from latents with σ = 0.5 noise: {_ms(rec[0.8][0.5])} vs "
                f"{_ms(rec[0.0][0.5])} dB.")
        write_readme_table("\n".join([*fd_rows, "", psnr, "", *d_rows, "", f"(seeds {opts.seeds}; `{cmd}`)"]),
                           marker="rae")
    _log(f"wrote {results / (stem + '.md')} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
