"""Timestep conventions and seeded noise."""

from __future__ import annotations

import pytest
import torch

from difffeat.noise import NoiseSchedule, flow_interpolate, sample_seed, seeded_noise


def test_index_zero_is_least_noise() -> None:
    s = NoiseSchedule.from_config({})
    a = s.alphas_cumprod
    assert s.num_train_timesteps == 1000
    assert a[0] > 0.999 and bool((a[1:] < a[:-1]).all())


@pytest.mark.parametrize("bad", [-1, 1000, 2.5, True])
def test_out_of_range_timestep_names_the_range(bad) -> None:
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        NoiseSchedule.from_config({}).validate([10, bad])


def test_add_noise_matches_diffusers() -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    s = NoiseSchedule.from_scheduler(sched)
    x, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(s.add_noise(x, eps, t), sched.add_noise(x, eps, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.velocity(x, eps, t), sched.get_velocity(x, eps, t), rtol=1e-5, atol=1e-6)


def test_noise_depends_on_index_not_on_batch() -> None:
    a = seeded_noise((1, 4, 4), [5, 6, 7], seed=0)
    b = seeded_noise((1, 4, 4), [7, 5], seed=0)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(seeded_noise((1, 4, 4), [5], seed=1)[0], a[0])
    assert sample_seed(0, 1, 0) != sample_seed(0, 0, 1)


def test_flow_interpolant_endpoints() -> None:
    x, eps = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(flow_interpolate(x, eps, torch.tensor([0.0, 1.0])), torch.stack([x[0], eps[1]]))



def test_shifted_flow_schedule_matches_the_diffusers_scheduler() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difffeat.noise import FlowSchedule

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0
    grid = scheduler.sigmas.flip(0).double()  # diffusers' training grid, ascending: shift(j / T), j = 1 … T
    torch.testing.assert_close(schedule.sigmas(torch.arange(1, 1001)), grid, rtol=1e-6, atol=1e-6)
    k = torch.tensor([1, 250, 500, 999])
    torch.testing.assert_close(schedule.model_timesteps(k), (grid[k - 1] * 1000).float(), rtol=1e-5, atol=1e-3)
    x, eps = torch.zeros(4, 2), torch.ones(4, 2)
    torch.testing.assert_close(schedule.add_noise(x, eps, k)[:, 0].double(), grid[k - 1], rtol=1e-6, atol=1e-6)
    assert FlowSchedule(1000).model_timesteps(k) is k  # shift 1: the index itself, as SiT was trained


def test_dynamic_shift_is_resolved_as_the_flux_pipeline_does() -> None:
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
              "base_shift": 0.5, "max_shift": 1.15}
    schedule = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**config))
    assert schedule.dynamic is not None
    assert math.isclose(schedule.for_sequence_length(256).shift, math.exp(0.5))
    assert math.isclose(schedule.for_sequence_length(4096).shift, math.exp(1.15))
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = 0.5 + (1024 - 256) * (1.15 - 0.5) / (4096 - 256)
    scheduler.set_timesteps(sigmas=[0.75, 0.5, 0.25], mu=mu)  # what the pipeline does at 1024 image tokens
    ours = schedule.for_sequence_length(1024)
    torch.testing.assert_close(scheduler.sigmas[:3].double(),
                               ours.sigmas(torch.tensor([750, 500, 250])), rtol=1e-5, atol=1e-6)
