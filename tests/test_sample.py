"""Samplers on diffusers schedulers: every prediction type recovers a known x0, and the DDIM path
reproduces the hand-written update it replaced (so generation metrics measured before do not move)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from difffeat.backbones import create_backbone
from difffeat.noise import FlowSchedule, NoiseSchedule
from difffeat.sample import sample

SIZE, CHANNELS = 4, 2


def _target() -> torch.Tensor:
    """The known clean sample every oracle denoises towards (inside [-1, 1], so the clamp is a no-op)."""
    return torch.linspace(-0.9, 0.9, CHANNELS * SIZE * SIZE).view(1, CHANNELS, SIZE, SIZE)


class Oracle(nn.Module):
    """A backbone stand-in whose prediction is the exact analytic answer for the clean sample
    :func:`_target`, in the parametrisation its schedule names."""

    latent_channels, latent_size = CHANNELS, SIZE

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.weight = nn.Parameter(torch.zeros(1))  # the sampler reads device and dtype from a parameter

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, x0 = x_t.double(), _target().double()
        if isinstance(self.schedule, FlowSchedule):
            s = (t.double() / self.schedule.num_train_timesteps).view(-1, 1, 1, 1)
            return ((x - x0) / s).float()  # v = ε - x0 with x_t = (1 - s) x0 + s ε
        a = self.schedule.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"epsilon": eps, "sample": x0.expand_as(x),
               "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}.get(self.schedule.prediction_type, eps)
        return out.float()


def _ddpm(prediction_type: str) -> NoiseSchedule:
    return NoiseSchedule.from_config({"_class_name": "DDPMScheduler", "prediction_type": prediction_type})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_an_exact_prediction_recovers_the_clean_sample(prediction_type: str, steps: int) -> None:
    out = sample(Oracle(_ddpm(prediction_type)), 3, steps=steps, seed=0, batch_size=2)
    torch.testing.assert_close(out, _target().expand(3, -1, -1, -1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 7])
def test_an_exact_flow_velocity_recovers_the_clean_sample(steps: int) -> None:
    out = sample(Oracle(FlowSchedule(1000)), 3, steps=steps, seed=0)
    torch.testing.assert_close(out, _target().expand(3, -1, -1, -1), rtol=0, atol=1e-4)


def test_an_unknown_prediction_type_names_it_and_the_valid_ones() -> None:
    schedule = _ddpm("epsilon")
    schedule.prediction_type = "x0"
    with pytest.raises(ValueError, match=r"'x0'.*'epsilon', 'v_prediction', 'sample'"):
        sample(Oracle(schedule), 1, steps=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(Oracle(schedule), 1, steps=0)


@torch.inference_mode()
def _hand_written(backbone, n: int, steps: int, seed: int, batch_size: int) -> torch.Tensor:
    """The sampler as it was before it moved onto diffusers schedulers (the reference for FD numbers)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    schedule = backbone.schedule
    T = schedule.num_train_timesteps
    out = []
    for start in range(0, n, batch_size):
        x = torch.randn((min(batch_size, n - start), *shape), generator=gen)
        c = x.shape[1]
        if isinstance(schedule, FlowSchedule):
            grid = torch.linspace(1.0, 0.0, steps + 1)
            for t_now, t_next in itertools.pairwise(grid.tolist()):
                v = backbone(x, torch.full((len(x),), float(t_now) * T))[:, :c]
                x = x + (t_next - t_now) * v
        else:
            a = schedule.alphas_cumprod
            ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
            for i, t in enumerate(ts):
                out_t = backbone(x, torch.full((len(x),), t, dtype=torch.long))[:, :c]
                a_t = a[t].float()
                a_prev = a[ts[i + 1]].float() if i + 1 < len(ts) else torch.tensor(1.0)
                if schedule.prediction_type == "v_prediction":
                    x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out_t
                    eps = (1 - a_t).sqrt() * x + a_t.sqrt() * out_t
                else:
                    eps = out_t
                    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        out.append(x.clamp(-1, 1).float())
    return torch.cat(out)


class Perturbed(Oracle):
    """The oracle plus a small multiple of a real U-Net's output: samples stay inside ``[-1, 1]`` (a
    random network alone saturates the clamp, which would hide any difference), while every step
    still depends on the network."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__(schedule)
        self.net = create_backbone("unet2d-tiny", scheduler=schedule)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x_t, t) + 0.5 * self.net(x_t[:, :1], t).repeat(1, CHANNELS, 1, 1)


@pytest.mark.parametrize("schedule", ["epsilon", "v_prediction", "flow"])
@pytest.mark.parametrize("steps", [2, 3, 25])  # one ε step from t = 999 would saturate the clamp
def test_the_scheduler_path_equals_the_hand_written_update(schedule: str, steps: int) -> None:
    backbone = Perturbed(FlowSchedule(1000) if schedule == "flow" else _ddpm(schedule))
    new = sample(backbone, 3, steps=steps, seed=1, batch_size=2)
    assert (new.abs() < 1).float().mean() > 0.9  # the comparison is not decided by the clamp
    assert (new - _target()).abs().max() > 1e-3  # the network's part of the prediction matters
    assert torch.equal(new, _hand_written(backbone, 3, steps, 1, 2))  # bit for bit: FD numbers stay
