"""The ``"ddim_inversion"`` noise rule: exact for a perfect denoiser, deterministic, batch-independent, keyed.

Tolerances: with an oracle denoiser the inversion is exact up to rounding. Measured for the inputs of
these tests (float32 trajectories over the 13-interval grid of ``TS`` with 10 steps, latents of
magnitude ~4): at most 1.4e-5 off the forward-noised latent for ε / v / x0 prediction, 1.6e-5 for flow
with shift 1 and 5.2e-6 with shift 3; in float64 the DDPM inversion is exact to 2.8e-14 (diffusers' flow
step computes in float32). The tests allow 5e-5 in float32 and 1e-10 in float64.
"""

from __future__ import annotations

import pytest
import torch

import difffeat.extract
from difffeat.backbones import create_backbone
from difffeat.extract import CPU_ROWS, FeatureExtractor
from difffeat.noise import NOISE_RULES, FlowSchedule, NoiseSchedule, ddim_invert, inversion_grid
from difffeat.sample import sampling_scheduler

TS = [7, 250, 600, 999]  # off the uniform grid: 7, 250 and 600 must be inserted
F32_TOL, F64_TOL = 5e-5, 1e-10


def _ddpm_oracle(schedule: NoiseSchedule, x0_true: torch.Tensor):
    """The exact denoiser of the point mass at ``x0_true``: the ε / v / x0 consistent with ``x_t``."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * x0_true) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0_true,
                "sample": x0_true.clone()}[schedule.prediction_type]

    return denoise


def _flow_oracle(x0_true: torch.Tensor, eps_true: torch.Tensor, T: int = 1000):
    """The exact velocity ``(x - x0)/σ = ε - x0`` of the point mass; at ``σ = 0``, its limit towards ``eps_true``."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t.double() / T).view(-1, 1, 1, 1).to(x.dtype)  # the network timestep is σ·T
        return torch.where(sigma > 0, (x - x0_true) / sigma.clamp_min(1e-30), eps_true - x0_true)

    return denoise


def test_grid_is_uniform_with_the_requested_timesteps_inserted() -> None:
    assert inversion_grid([999, 111, 444], 9) == list(range(0, 1000, 111))  # on the grid: nothing inserted
    grid = inversion_grid(TS, 10)
    assert grid == [0, 7, 100, 200, 250, 300, 400, 500, 599, 600, 699, 799, 899, 999]
    assert inversion_grid([3], 50) == [0, 1, 2, 3]  # more steps than indices: every index once
    assert inversion_grid([0], 5) == [0]
    with pytest.raises(ValueError, match="steps"):
        inversion_grid([10], 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_inversion_lands_on_the_forward_process_at_each_alpha_bar(prediction_type, dtype) -> None:
    """For the exact denoiser of ``x0_true``, the inverted latent at ``t`` is ``sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε``.

    The input is the state at index 0 (the clean end of the inversion) built with ``eps_true``; any
    ᾱ off by a grid point, a wrong prediction-type conversion or a step evaluated at the wrong timestep
    moves the result by far more than the tolerance.
    """
    schedule = NoiseSchedule.from_config({"prediction_type": prediction_type})
    gen = torch.Generator().manual_seed(0)
    x0_true, eps_true = (torch.randn(2, 3, 4, 4, generator=gen, dtype=dtype) for _ in range(2))
    x_in = schedule.add_noise(x0_true, eps_true, torch.zeros(2, dtype=torch.long))
    out = ddim_invert(_ddpm_oracle(schedule, x0_true), schedule, x_in, TS, 10)
    assert list(out) == TS
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    for t in TS:
        expected = schedule.add_noise(x0_true, eps_true, torch.full((2,), t))
        torch.testing.assert_close(out[t], expected, rtol=0, atol=tol)
        assert out[t].dtype == dtype
    # the off-by-one-grid-point alternative is far away, so the check above can fail
    wrong = schedule.add_noise(x0_true, eps_true, torch.full((2,), 251))
    assert (out[250] - wrong).abs().max() > 100 * tol


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inverting_then_ddim_sampling_on_the_same_grid_reconstructs_the_input(prediction_type) -> None:
    """difffeat's own DDIM sampler (``sampling_scheduler``, 10 steps: grid 999, 888, …, 0) undoes the inversion."""
    schedule = NoiseSchedule.from_config({"prediction_type": prediction_type})
    gen = torch.Generator().manual_seed(1)
    x0_true, eps_true = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    x_in = schedule.add_noise(x0_true, eps_true, torch.zeros(2, dtype=torch.long))
    oracle = _ddpm_oracle(schedule, x0_true)
    x = ddim_invert(oracle, schedule, x_in, [999], 9)[999]
    scheduler, model_timesteps, step_timesteps = sampling_scheduler(schedule, 10)
    assert model_timesteps.flip(0).tolist() == inversion_grid([999], 9)  # the same grid
    states = []
    for t_model, t_step in zip(model_timesteps, step_timesteps, strict=True):
        x = scheduler.step(oracle(x, torch.full((2,), int(t_model))), t_step, x).prev_sample
        states.append(x)
    torch.testing.assert_close(states[-2], x_in, rtol=0, atol=F32_TOL)  # back at index 0
    torch.testing.assert_close(states[-1], x0_true, rtol=0, atol=F32_TOL)  # the sampler's last step: ᾱ = 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inversion_reverses_a_ddim_scheduler_over_its_non_uniform_grid(prediction_type) -> None:
    """With requested timesteps inserted, diffusers' ``DDIMScheduler`` over the same grid comes back to the input."""
    from diffusers import DDIMScheduler

    schedule = NoiseSchedule.from_config({"prediction_type": prediction_type, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012})
    gen = torch.Generator().manual_seed(2)
    x0_true, eps_true = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    x_in = schedule.add_noise(x0_true, eps_true, torch.zeros(3, dtype=torch.long))
    oracle = _ddpm_oracle(schedule, x0_true)
    x = ddim_invert(oracle, schedule, x_in, TS, 10)[999]
    grid = inversion_grid(TS, 10)
    a = schedule.alphas_cumprod[torch.tensor(grid)]
    betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
    scheduler = DDIMScheduler(num_train_timesteps=len(grid), trained_betas=betas.tolist(), clip_sample=False,
                              set_alpha_to_one=False, steps_offset=0, prediction_type=prediction_type)
    scheduler.alphas_cumprod = a.float()
    scheduler.set_timesteps(len(grid))
    for j in scheduler.timesteps.tolist()[:-1]:  # grid point j down to j - 1, ending at index 0
        x = scheduler.step(oracle(x, torch.full((3,), grid[j])), j, x).prev_sample
    torch.testing.assert_close(x, x_in, rtol=0, atol=F32_TOL)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_inversion_is_the_euler_ode_from_sigma_zero_and_sampling_undoes_it(shift) -> None:
    """Flow (SD3-style shift 3 included): x_t lands on ``(1 - σ_t) x0 + σ_t ε``; diffusers' Euler sampler goes back."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift))
    assert isinstance(schedule, FlowSchedule)
    gen = torch.Generator().manual_seed(3)
    x0_true, eps_true = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    oracle = _flow_oracle(x0_true, eps_true)
    out = ddim_invert(oracle, schedule, x0_true, [0, *TS], 10)
    assert torch.equal(out[0], x0_true)  # σ = 0 is the data
    for t in TS:
        torch.testing.assert_close(out[t], schedule.add_noise(x0_true, eps_true, torch.full((2,), t)),
                                   rtol=0, atol=F32_TOL)
    # back down with diffusers' own shifting: the scheduler maps the unshifted grid k/T to the same σ's
    grid = torch.tensor(inversion_grid(TS, 10))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=(grid[1:].flip(0).double() / 1000).tolist())  # ends at the appended σ = 0
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), schedule.sigmas(grid[1:].flip(0)), rtol=1e-6,
                               atol=1e-6)
    x = out[999]
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(x, x0_true, rtol=0, atol=F32_TOL)


# ----------------------------------------------------------------------------- the extractor's rule


def _digits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_extractor_feeds_the_tapped_forward_the_inverted_latents() -> None:
    """The rows of the tapped forwards are ``ddim_invert``'s latents, at ``model_timesteps(t)``, not ``add_noise``."""
    backbone = create_backbone("unet2d-tiny", seed=0)
    fe = FeatureExtractor(backbone, ["up_blocks.0"], [30, 400], noise="ddim_inversion", inversion_steps=2,
                          early_exit=False)
    backbone.feature_info  # noqa: B018 (the one-row probe forward, before counting)
    x = _digits(5)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = backbone.model.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[1])))
    calls: list[int] = []
    outer = backbone.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        fe(x, range(5))
    finally:
        handle.remove()
        outer.remove()
    n_steps = len(inversion_grid([30, 400], 2)) - 1  # 0, 30, 200, 400: 3 steps
    assert n_steps == 3 and len(seen) == n_steps + 1 and calls == [CPU_ROWS] * (n_steps + 1)
    # every inversion call went through the Backbone module (plug-ins apply), padded to CPU_ROWS

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pad = CPU_ROWS - len(z)
        return backbone(torch.cat([z, z[-1:].expand(pad, -1, -1, -1)]), torch.cat([t, t[-1:].expand(pad)]))[:len(z)]

    with torch.no_grad():
        ref = ddim_invert(denoise, backbone.schedule, x, [30, 400], 2)
    tapped_x, tapped_t = seen[-1]
    assert torch.equal(tapped_x[:10], torch.cat([ref[30], ref[400]]))
    assert tapped_t[:10].tolist() == [30] * 5 + [400] * 5
    random = backbone.schedule.add_noise(x, torch.zeros_like(x), torch.full((5,), 400))
    assert not torch.allclose(tapped_x[5:10], random)


def test_inversion_features_do_not_depend_on_batch_size_batch_or_order() -> None:
    """33 images: two padded CPU chunks per inversion step; bit-identical features for any batching or order."""
    backbone = create_backbone("unet2d-tiny", seed=0)
    x = _digits(33, seed=1)
    kw = {"layers": ["down_blocks.1", "up_blocks.0"], "timesteps": [10, 300], "noise": "ddim_inversion",
          "inversion_steps": 1}  # grid 0, 10, 300: two steps
    runs = [FeatureExtractor(backbone, batch_size=bs, **kw)(x, range(33)) for bs in (1, 64)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    perm = torch.randperm(33, generator=torch.Generator().manual_seed(0))
    shuffled = FeatureExtractor(backbone, **kw)(x[perm], perm)  # other neighbours in every forward
    assert all(torch.equal(runs[0][k][perm], shuffled[k]) for k in runs[0])
    few = FeatureExtractor(backbone, **kw)(x[30:], range(30, 33))  # one padded chunk instead of two
    assert all(torch.equal(runs[0][k][30:], few[k]) for k in runs[0])


def test_inversion_calls_see_each_image_its_own_condition() -> None:
    """Per-image text embeddings are routed per row in the inversion too, not only in the tapped forward."""
    backbone = create_backbone("sd-unet-tiny", seed=0)
    gen = torch.Generator().manual_seed(5)
    x, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 3, 16, generator=gen)
    fe = FeatureExtractor(backbone, ["down_blocks.1"], [300], noise="ddim_inversion", inversion_steps=1)
    seen: list[torch.Tensor] = []
    handle = backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[2]))
    try:
        pair = fe(x, cond=cond)[("down_blocks.1", 300)]
    finally:
        handle.remove()
    assert len(seen) == 2 and all(torch.equal(c[:2], cond) for c in seen)  # one inversion step, then the taps
    alone = fe(x[1:], cond=cond[1:])[("down_blocks.1", 300)]
    assert torch.equal(pair[1:], alone)
    swapped = fe(x[1:], cond=cond[:1])[("down_blocks.1", 300)]
    assert not torch.allclose(swapped, alone, rtol=1e-3, atol=1e-5)


def test_inversion_forwards_respect_batch_size_on_an_accelerator(monkeypatch) -> None:
    monkeypatch.setattr(difffeat.extract, "_fixed_rows", lambda device: None)  # the accelerator path
    backbone = create_backbone("unet2d-tiny", seed=0)
    x = _digits(12, seed=2)
    kw = {"layers": ["up_blocks.0"], "timesteps": [50, 200], "noise": "ddim_inversion", "inversion_steps": 2}
    backbone.feature_info  # noqa: B018 (the one-row probe forward, before counting)
    seen: list[int] = []
    handle = backbone.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        small = FeatureExtractor(backbone, batch_size=8, **kw)(x)
    finally:
        handle.remove()
    assert seen == [8, 4] * 3 + [8, 8, 8]  # 3 inversion steps (grid 0, 50, 100, 200) of 12 images, 24 tapped rows
    whole = FeatureExtractor(backbone, batch_size=24, **kw)(x)
    for k in small:  # no padding off the CPU: equal to float rounding, not bit for bit
        torch.testing.assert_close(small[k], whole[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "layers"), [("unet2d-tiny", ["up_blocks.0"]),
                                              ("dit-tiny", ["transformer_blocks.1"])])
def test_inversion_on_real_backbones_runs_and_is_keyed(name, layers) -> None:
    """dit-tiny predicts 8 channels (ε and variance) for 4 latent ones: the inversion reads the first 4."""
    backbone = create_backbone(name, seed=0)
    c, s = backbone.image_channels, backbone.image_size
    x = torch.rand(3, c, s, s, generator=torch.Generator().manual_seed(4)) * 2 - 1
    inv = FeatureExtractor(backbone, layers, [20, 500], noise="ddim_inversion", inversion_steps=10)
    idx = FeatureExtractor(backbone, layers, [20, 500])
    f_inv, f_idx = inv(x, range(3)), idx(x, range(3))
    for k in f_inv:
        assert f_inv[k].shape == f_idx[k].shape and torch.isfinite(f_inv[k]).all()
        assert not torch.allclose(f_inv[k], f_idx[k], rtol=1e-3, atol=1e-4)
    spec = inv.spec()
    other = FeatureExtractor(backbone, layers, [20, 500], noise="ddim_inversion", inversion_steps=20).spec()
    assert spec["noise"] == "ddim_inversion" and spec["inversion_steps"] == 10 and other["inversion_steps"] == 20
    assert spec != idx.spec() and spec != other
    assert "inversion_steps" not in idx.spec()  # random-rule keys are unchanged
    f_other = FeatureExtractor(backbone, layers, [20, 500], noise="ddim_inversion", inversion_steps=3)(x)
    assert not torch.equal(f_other[(layers[0], 500)], f_inv[(layers[0], 500)])


def test_shifted_flow_backbone_inverts() -> None:
    """A flow DiT with an SD3-style shift: the network receives σ·T during the inversion and the taps."""
    backbone = create_backbone("dit-tiny", seed=0, scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                              "shift": 3.0})
    backbone.feature_info  # noqa: B018 (the one-row probe forward, before counting)
    assert isinstance(backbone.schedule, FlowSchedule) and backbone.schedule.shift == 3.0
    seen: list[torch.Tensor] = []
    handle = backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    try:
        out = FeatureExtractor(backbone, ["transformer_blocks.1"], [250], noise="ddim_inversion",
                               inversion_steps=2)(torch.randn(2, 4, 8, 8))
    finally:
        handle.remove()
    assert torch.isfinite(out[("transformer_blocks.1", 250)]).all()
    expected = backbone.schedule.model_timesteps(torch.tensor([0, 125, 250]))  # grid 0, 125, 250
    torch.testing.assert_close(torch.stack([t[0] for t in seen]).float(), expected.float())


def test_ensemble_is_refused_and_unknown_rules_list_every_rule() -> None:
    backbone = create_backbone("unet2d-tiny")
    with pytest.raises(ValueError, match=r"ensemble=4 with noise='ddim_inversion'.*deterministic"):
        FeatureExtractor(backbone, ["up_blocks.0"], [10], noise="ddim_inversion", ensemble=4)
    with pytest.raises(ValueError, match="inversion_steps"):
        FeatureExtractor(backbone, ["up_blocks.0"], [10], noise="ddim_inversion", inversion_steps=0)
    with pytest.raises(ValueError, match="noise must be one of") as info:
        FeatureExtractor(backbone, ["up_blocks.0"], [10], noise="inverted")
    assert all(repr(rule) in str(info.value) for rule in ("index", "content", "ddim_inversion"))
    assert NOISE_RULES == ("index", "content", "ddim_inversion")
    FeatureExtractor(backbone, ["up_blocks.0"], [10], noise="index", ensemble=4)  # random rules still average
