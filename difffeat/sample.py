"""Deterministic samplers for the backbones difffeat trains (used to measure generation quality).

* Flow models (:class:`~difffeat.noise.FlowSchedule`): Euler integration of the probability-flow ODE
  ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` on a uniform grid.
* DDPM models (ε or v prediction): DDIM with ``η = 0`` on evenly spaced timesteps.
"""

from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from difffeat.backbones.base import Backbone
from difffeat.noise import FlowSchedule

__all__ = ["sample"]


@torch.inference_mode()
def sample(backbone: Backbone, n: int, steps: int = 50, seed: int = 0, batch_size: int = 256,
           progress: bool = False) -> torch.Tensor:
    """``n`` samples ``(n, C, H, W)`` from ``backbone`` (unconditional), clamped to ``[-1, 1]``.

    Args:
        backbone: a pixel-space backbone.
        n: number of samples.
        steps: integration / DDIM steps.
        seed: seed of the initial noise.
        batch_size: samples per forward.
        progress: show a progress bar.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    param = next(backbone.parameters())
    gen = torch.Generator().manual_seed(seed)
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    schedule = backbone.schedule
    T = schedule.num_train_timesteps
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling"):
        x = torch.randn((min(batch_size, n - start), *shape), generator=gen).to(param)
        c = x.shape[1]
        if isinstance(schedule, FlowSchedule):
            grid = torch.linspace(1.0, 0.0, steps + 1)
            for t_now, t_next in itertools.pairwise(grid.tolist()):
                v = backbone(x, torch.full((len(x),), float(t_now) * T, device=x.device))[:, :c]
                x = x + (t_next - t_now) * v
        else:
            a = schedule.alphas_cumprod.to(x.device)
            ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
            for i, t in enumerate(ts):
                out_t = backbone(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))[:, :c]
                a_t = a[t].float()
                a_prev = a[ts[i + 1]].float() if i + 1 < len(ts) else torch.tensor(1.0)
                if schedule.prediction_type == "v_prediction":
                    x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out_t
                    eps = (1 - a_t).sqrt() * x + a_t.sqrt() * out_t
                else:
                    eps = out_t
                    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)
