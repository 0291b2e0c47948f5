"""DeepCache on diffusers U-Nets: interval 1 is the uncached sampler bit for bit, larger intervals skip the deep
modules and stay close, the hooks leave no trace, and bad settings fail with clear errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from difffeat.backbones import create_backbone
from difffeat.backbones.unet import UNet2DBackbone
from difffeat.cache import DeepCache, cached_modules, quadratic_full_steps, skip_connections
from difffeat.sample import sample, sampling_scheduler

BACKBONES = ["unet2d-tiny", "sd-unet-tiny"]  # a UNet2DModel and a UNet2DConditionModel


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request: pytest.FixtureRequest):
    return create_backbone(request.param).eval()


def _noise(backbone, n: int = 2, seed: int = 0) -> torch.Tensor:
    shape = (n, backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _denoise(backbone, x: torch.Tensor, steps: int, cache: DeepCache | None = None) -> torch.Tensor:
    """A DDIM loop of ``steps`` steps from ``x`` (the cache, when given, is attached and reset)."""
    scheduler, model_t, step_t = sampling_scheduler(backbone.schedule, steps)
    if cache is not None:
        cache.reset(steps)
    for tm, ts in zip(model_t, step_t, strict=True):
        x = scheduler.step(backbone(x, torch.full((len(x),), int(tm))), ts, x).prev_sample
    return x


def _counter(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("branch", [0, 3])
def test_interval_one_is_the_uncached_sampler_bit_for_bit(backbone, branch: int) -> None:
    x = _noise(backbone)
    ref = _denoise(backbone, x, 6)
    cache = DeepCache(interval=1, branch=branch)
    with cache.attach(backbone):
        out = _denoise(backbone, x, 6, cache)
    assert torch.equal(out, ref)
    assert cache.stats == {"full": 6, "cached": 0}


def test_the_sampler_takes_a_cache_and_resets_it_per_batch(backbone) -> None:
    ref = sample(backbone, 3, steps=4, seed=1, batch_size=2)
    # batches of 2 and 1: a cache not reset between them would refuse the second batch's shape
    assert torch.equal(sample(backbone, 3, steps=4, seed=1, batch_size=2, cache=DeepCache(1)), ref)
    cache = DeepCache(interval=2, branch=0)
    cached = sample(backbone, 3, steps=4, seed=1, batch_size=2, cache=cache)
    assert cache.stats == {"full": 4, "cached": 4}
    assert not torch.equal(cached, ref)


@pytest.mark.parametrize("interval", [2, 3])
def test_larger_intervals_differ_but_stay_close(backbone, interval: int) -> None:
    x = _noise(backbone)
    ref = _denoise(backbone, x, 9)
    with DeepCache(interval, branch=0).attach(backbone) as cache:
        out = _denoise(backbone, x, 9, cache)
    assert cache.stats == {"full": -(-9 // interval), "cached": 9 - -(-9 // interval)}
    assert not torch.equal(out, ref)
    # closer to the uncached trajectory than the uncached trajectory of other noise is
    other = _denoise(backbone, _noise(backbone, seed=1), 9)
    assert (out - ref).abs().mean() < 0.5 * (other - ref).abs().mean()


def test_a_cached_step_runs_only_the_shallow_path(backbone) -> None:
    """On a cached step the deep modules are not called, and with the full step's own input the output is
    the uncached one exactly (the cached deep features are the ones the step would compute)."""
    unet = copy.deepcopy(backbone)  # counting hooks stay off the shared fixture
    model = unet.model
    # (a skipped module's own hooks still fire, with its cached output: count what runs inside it)
    deep, shallow = _counter(model.mid_block.resnets[0]), _counter(model.conv_in)
    last_up = _counter(model.up_blocks[-1].resnets[-1])
    first_down = _counter(model.down_blocks[0].resnets[0])
    x, t = _noise(unet), torch.full((2,), 500)
    with torch.inference_mode():
        ref = unet(x, t)
        with DeepCache(interval=4, branch=0).attach(unet) as cache:
            full, cached = unet(x, t), unet(x, t)
            moved = unet(x + 0.5, torch.full((2,), 400))
    assert torch.equal(full, ref) and torch.equal(cached, ref)
    assert not torch.equal(moved, ref)
    assert cache.stats == {"full": 1, "cached": 2}
    assert deep[0] == 2 and first_down[0] == 2  # the uncached call and the full step only
    assert shallow[0] == 4 and last_up[0] == 4  # every call


def test_taps_on_skipped_modules_read_the_cached_features(backbone) -> None:
    backbone._feature_info = None  # the taps' probe forward runs inside the cache, bypassing it
    x, t = _noise(backbone), torch.full((2,), 500)
    with torch.inference_mode(), DeepCache(interval=4).attach(backbone) as cache:
        with cache.bypass():
            assert "mid_block" in backbone.feature_info
        with backbone.tap(["mid_block"], stop_early=False) as found:
            backbone(x, t)
        full = found["mid_block"]
        with backbone.tap(["mid_block"], stop_early=False) as found:
            backbone(x + 1, torch.full((2,), 400))
    assert torch.equal(found["mid_block"], full)
    assert cache.stats == {"full": 1, "cached": 1}


def test_hooks_are_removed_afterwards_also_after_an_error(backbone) -> None:
    fresh = copy.deepcopy(backbone)
    x, t = _noise(backbone), torch.full((2,), 300)
    with pytest.raises(ZeroDivisionError), DeepCache(interval=3, branch=1).attach(backbone):
        with torch.inference_mode():
            backbone(x, t)
        1 / 0  # noqa: B018 (an error inside the block)
    for module in backbone.model.modules():
        assert "forward" not in vars(module) and not hasattr(module, "_diffusers_hook")
    with torch.inference_mode():
        assert torch.equal(backbone(x, t), fresh(x, t))
        assert torch.equal(backbone(x, torch.full((2,), 200)), fresh(x, torch.full((2,), 200)))


def test_a_stopped_full_step_is_not_reused(backbone) -> None:
    """A tap that ends a full step early leaves the cache incomplete: the next step runs in full."""
    x, t = _noise(backbone), torch.full((2,), 500)
    with torch.inference_mode(), DeepCache(interval=4).attach(backbone) as cache:
        with backbone.tap(["conv_in"]):
            assert backbone.run(x, t) is None
        backbone(x, t)
    assert cache.stats == {"full": 2, "cached": 0}


def test_branches_follow_the_skip_connections() -> None:
    scenes = create_backbone("sd-unet-scenes")
    skips = skip_connections(scenes)
    assert len(skips) == 8 and skips[0].producer == "conv_in" and skips[0].consumer == "up_blocks.3.resnets.1"
    assert [s.producer for s in skips[1:3]] == ["down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0"]
    assert skips[-1].producer == "down_blocks.3.attentions.0" and skips[-1].consumer == "up_blocks.0.resnets.0"
    assert cached_modules(scenes, 7) == ["mid_block"]
    branch0 = cached_modules(scenes, 0)
    assert branch0[:5] == [f"down_blocks.{i}" for i in range(4)] + ["mid_block"]
    assert branch0[-1] == "up_blocks.3.resnets.0"
    # inside a block: the layers deeper than the branch, resnet and attention together
    assert cached_modules(scenes, 4)[-2:] == ["up_blocks.1.resnets.0", "up_blocks.1.attentions.0"]


def test_the_quadratic_schedule_crowds_its_full_steps_around_the_center() -> None:
    steps = quadratic_full_steps(50, 5, center=20, power=1.4)
    assert len(steps) == 10 and steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] < 50
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    near = min(range(len(gaps)), key=lambda i: abs(steps[i] - 20))
    assert gaps[near] < gaps[-1] and gaps[near] < gaps[0]
    assert quadratic_full_steps(4, 1) == [0, 1, 2, 3]
    cache = DeepCache(5, schedule="quadratic", steps=50, center=20)
    assert cache.full_steps() == steps


def test_the_quadratic_schedule_runs_its_full_steps(backbone) -> None:
    x = _noise(backbone)
    cache = DeepCache(3, schedule="quadratic", steps=9)
    with cache.attach(backbone):
        _denoise(backbone, x, 9, cache)
    assert cache.stats["full"] == len(cache.full_steps()) == 3


def test_last_full_runs_the_last_step_in_full(backbone) -> None:
    x = _noise(backbone)
    cache = DeepCache(3, steps=5, last_full=True)
    assert cache.full_steps() == [0, 3, 4]
    with cache.attach(backbone):
        _denoise(backbone, x, 5, cache)
        assert cache.stats == {"full": 3, "cached": 2}
        cache.reset(7)  # another trajectory length: its own last step
        assert cache.full_steps() == [0, 3, 6]
    with pytest.raises(ValueError, match="last_full needs to know the last step"):
        DeepCache(3, last_full=True)


def test_bad_settings_fail_clearly(backbone) -> None:
    for interval in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="interval must be an integer >= 1"):
            DeepCache(interval)
    with pytest.raises(ValueError, match="branch must be"):
        DeepCache(2, branch=-1)
    with pytest.raises(KeyError, match="'uniform', 'quadratic'"):
        DeepCache(2, schedule="cosine")
    with pytest.raises(ValueError, match="give steps="):
        DeepCache(2, schedule="quadratic")
    with pytest.raises(ValueError, match="belong to the 'quadratic' schedule"):
        DeepCache(2, center=3)
    with pytest.raises(ValueError, match=r"center must lie in \[0, 9\]"):
        quadratic_full_steps(10, 2, center=10)
    unknown = r"unknown skip branch 4: this U-Net has skip connections 0-3.*0: conv_in"
    with pytest.raises(ValueError, match=unknown), DeepCache(2, branch=4).attach(backbone):
        pass
    with pytest.raises(TypeError, match="needs a diffusers U-Net"), DeepCache(2).attach(nn.Linear(2, 2)):
        pass


def test_misuse_inside_a_loop_fails_clearly(backbone) -> None:
    x, t = _noise(backbone), torch.full((2,), 500)
    cache = DeepCache(3, steps=2)
    with torch.inference_mode(), cache.attach(backbone):
        with pytest.raises(RuntimeError, match="already attached"), cache.attach(backbone):
            pass
        with pytest.raises(RuntimeError, match="already carries a DeepCache"), DeepCache(2).attach(backbone):
            pass
        backbone(x, t)
        with pytest.raises(ValueError, match=r"cached step got input of shape \(1,.*call cache.reset\(\)"):
            backbone(x[:1], t[:1])
        cache.reset()
        backbone(x, t)
        with pytest.raises(RuntimeError, match="new trajectory started without cache.reset"):
            backbone(x, torch.full((2,), 900))
        cache.reset()
        backbone(x, t), backbone(x, t)
        with pytest.raises(RuntimeError, match="after 2 steps: call cache.reset"):
            backbone(x, t)


def test_unsupported_blocks_are_refused() -> None:
    config = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "SkipDownBlock2D"],
              "up_block_types": ["SkipUpBlock2D", "UpBlock2D"], "norm_num_groups": 4}
    skip_unet = UNet2DBackbone.from_config(config)
    with pytest.raises(ValueError, match="down_blocks.1 is a SkipDownBlock2D.*supported blocks: DownBlock2D"):
        skip_connections(skip_unet)
