"""Deterministic samplers for the backbones difffeat trains (used to measure generation quality).

Every update is a diffusers scheduler's ``step``, built from the backbone's own schedule:

* Flow models (:class:`~difffeat.noise.FlowSchedule`): ``FlowMatchEulerDiscreteScheduler`` (with the
  schedule's shift; 1 is the plain linear interpolant), i.e. Euler integration of ``dx/dt = v(x, t)``
  from ``t = 1`` (noise) to
  ``t = 0`` on the uniform grid ``1, 1 - 1/steps, …, 1/steps``.
* DDPM models: ``DDIMScheduler`` with ``η = 0`` on the evenly spaced timesteps
  ``round(linspace(T - 1, 0, steps))``, for ε, v and x0 (``"sample"``) prediction.

``DDIMScheduler.step`` finds the previous timestep as ``t - T // steps``, which for this grid falls
between grid points (``T = 1000``, 25 steps: the grid spacing is 41.6, ``T // steps`` is 40). The
scheduler is therefore built over the grid itself, DDIM's sub-sequence τ (Song et al., §4.2): its
``ᾱ`` are the backbone's ``ᾱ`` at the grid points, so each ``step`` goes exactly from one grid point to
the next and the last one to ``ᾱ = 1``. The network still receives the real timestep ``τ_i``. The
samples equal those of the hand-written update this module used before (tests check it), so FD numbers
measured with it stay valid.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from difffeat.backbones.base import Backbone
from difffeat.noise import FlowSchedule, NoiseSchedule

if TYPE_CHECKING:
    from difffeat.cache import DeepCache

__all__ = ["PREDICTION_TYPES", "sample", "sampling_scheduler"]

#: what a DDPM-type network may predict (diffusers' names)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sampling_scheduler(schedule: NoiseSchedule, steps: int) -> tuple[Any, torch.Tensor, list[Any]]:
    """The diffusers scheduler that samples ``schedule`` in ``steps`` deterministic steps.

    Args:
        schedule: the backbone's noise schedule (a :class:`~difffeat.noise.FlowSchedule` or a discrete one).
        steps: number of network evaluations.

    Returns:
        ``(scheduler, model_timesteps, step_timesteps)``: for step ``i`` the network is called at
        ``model_timesteps[i]`` (its own timestep convention) and its output passed to
        ``scheduler.step(output, step_timesteps[i], x)``.

    Raises:
        ValueError: ``steps < 1``, or a prediction type the samplers do not know (named, with the valid ones).
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = schedule.num_train_timesteps
    if isinstance(schedule, FlowSchedule):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=schedule.shift)
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
        return scheduler, scheduler.timesteps, list(scheduler.timesteps)
    if schedule.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {schedule.prediction_type!r}; difffeat samples "
                         f"{', '.join(map(repr, PREDICTION_TYPES))} (and flow models)")
    grid = torch.linspace(T - 1, 0, steps).round().long()  # noisiest first
    a = schedule.alphas_cumprod[grid.flip(0)]  # ᾱ along τ, least noisy first
    betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
    scheduler = DDIMScheduler(num_train_timesteps=steps, trained_betas=betas.tolist(), clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                              prediction_type=schedule.prediction_type)
    # the backbone's ᾱ exactly: the scheduler's float32 cumulative product of the betas drifts in the last bits
    scheduler.alphas_cumprod = a.float()
    scheduler.set_timesteps(steps)  # steps-1, …, 0: one index per grid point, prev = index - 1
    return scheduler, grid, scheduler.timesteps.tolist()


@torch.inference_mode()
def sample(backbone: Backbone, n: int, steps: int = 50, seed: int = 0, batch_size: int = 256,
           progress: bool = False, cache: DeepCache | None = None, clamp: bool = True) -> torch.Tensor:
    """Draws ``n`` unconditional samples from ``backbone`` with a deterministic sampler.

    Args:
        backbone: a pixel-space backbone (its ``schedule`` says how it noises and what it predicts).
        n: number of samples.
        steps: integration / DDIM steps (network evaluations per sample).
        seed: seed of the initial noise (drawn on the CPU, so the same on every device).
        batch_size: samples per forward.
        progress: show a progress bar.
        cache: an optional :class:`~difffeat.cache.DeepCache`, attached to the backbone's U-Net for the run
            and reset before each batch (interval 1 gives the uncached samples bit for bit).
        clamp: clamp the samples to the image range ``[-1, 1]`` (``False`` for latents, which have none).

    Returns:
        ``(n, C, H, W)`` float32 samples on the CPU, clamped to ``[-1, 1]`` unless ``clamp`` is off.

    Raises:
        ValueError: ``steps < 1`` or an unknown prediction type (see :func:`sampling_scheduler`).
    """
    param = next(backbone.parameters())
    gen = torch.Generator().manual_seed(seed)
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    sampling_scheduler(backbone.schedule, steps)  # fails before any noise is drawn
    out = []
    with cache.attach(backbone) if cache is not None else nullcontext():
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling"):
            x = torch.randn((min(batch_size, n - start), *shape), generator=gen).to(param)
            c = x.shape[1]
            if cache is not None:
                cache.reset(steps)  # one trajectory per batch: no features of the last batch
            # a fresh scheduler per batch: the flow scheduler keeps a step index between calls
            scheduler, model_timesteps, step_timesteps = sampling_scheduler(backbone.schedule, steps)
            for t_model, t_step in zip(model_timesteps, step_timesteps, strict=True):
                t = torch.full((len(x),), t_model.item(), device=x.device, dtype=model_timesteps.dtype)
                pred = backbone(x, t)[:, :c]  # a DiT that also predicts its variance: the mean channels
                x = scheduler.step(pred, t_step, x).prev_sample
            out.append((x.clamp(-1, 1) if clamp else x).float().cpu())
    return torch.cat(out)
