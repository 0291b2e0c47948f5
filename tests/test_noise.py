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
