"""DeepCache: training-free reuse of a U-Net's deep features across denoising steps (Ma et al., CVPR 2024).

A U-Net's deep (low-resolution) features change little from one denoising step to the next, while its
shallow path is cheap. Every ``interval`` steps the U-Net runs in full and the outputs of its deep
modules are kept; on the steps in between only the *shallow path* runs: ``conv_in``, the down-path
layers that feed the skip connections ``0 … branch``, and the up-path layers that consume them. The
up-path feature entering skip connection ``branch`` (and every deeper output) is read from the cache.

**Branches.** A diffusers U-Net's skip connections are numbered from the shallowest: ``0`` is
``conv_in``'s output, then one per down-block layer (a resnet, followed by its attention where the block
has one) and one per downsampler, in execution order; the up-path resnet that concatenates each is its
consumer (:func:`skip_connections` lists them). ``branch=b`` keeps ``0 … b`` live. ``branch=0`` is
DeepCache's Stable-Diffusion setting (``cache_branch_id=0``: only ``conv_in``, the last up-path
resnet and ``conv_out`` run on a cached step); the largest branch skips only the mid block. The paper's
pixel-space DDPM code numbers one skip deeper (its ``branch=b`` keeps skips ``0 … b+1`` live): its
``branch=2`` is ``branch=3`` here.

**Hooks, not a copied forward.** PyTorch's forward hooks cannot skip a module's computation, so the
deep modules are wrapped with diffusers' own removable hook mechanism
(:class:`diffusers.hooks.HookRegistry`, the one its ``FirstBlockCache`` and ``FasterCache`` use): a
per-instance forward that returns the cached output on a cached step and calls the module's own forward
otherwise. Nothing of diffusers is copied or patched; :meth:`DeepCache.attach` removes every wrapper on
exit (also after an error), leaving the U-Net as it was. PyTorch forward hooks on a skipped module (the
taps of :meth:`~difffeat.backbones.base.Backbone.tap`) still fire, with the cached output: a feature
read at a cached step is the deep feature of the last full step, as DeepCache's U-Net sees it.

**Which step is it.** The cache counts U-Net calls since :meth:`DeepCache.reset`: one call per denoising
step (classifier-free guidance as one batched call), ``reset()`` between images (or batches). A call
whose timestep is *larger* than the previous one starts a new trajectory; without a reset in between it
is refused, as is a cached step whose input shape differs from the full step's. A full step that did not
finish (a tap stopped the forward early) leaves the cache incomplete; the next step then runs in full.
Forwards that are not denoising steps (a probe, features at another timestep) go inside
:meth:`DeepCache.bypass`. ``last_full=True`` runs the last step of every trajectory in full, for readers
of its features.

**Schedules** (:data:`SCHEDULES`). ``"uniform"``: full steps ``0, N, 2N, …`` (the paper's 1:N).
``"quadratic"``: the paper's non-uniform 1:N, ``ceil(steps / N)`` full steps packed around a
``center`` step with a power law (:func:`quadratic_full_steps`); it needs the number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difffeat.backbones.base import Backbone

__all__ = ["SCHEDULES", "DeepCache", "SkipConnection", "cached_modules", "quadratic_full_steps",
           "skip_connections", "uniform_full_steps"]

#: the name of difffeat's hooks in a module's diffusers hook registry
HOOK_NAME = "difffeat_deepcache"

#: down / up blocks whose layers the cache knows: resnets (each followed by its attention where the block
#: has attentions), then downsamplers / upsamplers. Skip and Karras blocks route extra streams and are refused.
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "ResnetDownsampleBlock2D",
               "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
             "SimpleCrossAttnUpBlock2D")


def uniform_full_steps(steps: int, interval: int) -> list[int]:
    """Full steps of the uniform 1:N strategy: ``0, N, 2N, …`` below ``steps``."""
    return list(range(0, steps, interval))


def quadratic_full_steps(steps: int, interval: int, center: int | None = None, power: float = 1.4) -> list[int]:
    """Full steps of DeepCache's non-uniform 1:N strategy: denser around ``center``.

    ``n = ceil(steps / interval)`` full steps. Offsets ``u`` are evenly spaced between ``-center^(1/p)`` and
    ``(steps - center)^(1/p)`` (``n + 1`` points); each gives the step ``center + sign(u)·|u|^p`` truncated
    towards ``center``, so the steps crowd near ``center`` and thin out towards both ends. The first offset
    (step 0) is always a full step, the last (step ``steps``) is dropped. Where truncation merges steps,
    ``p`` is lowered by 0.02 until ``n`` distinct steps remain, as the reference code does.

    The paper tunes ``center`` and ``power`` per model and gives no rule for other models; the defaults here
    are the middle of the trajectory and ``p = 1.4``.

    Args:
        steps: number of denoising steps.
        interval: ``N``: one full step per ``N`` steps on average.
        center: the step the full steps crowd around (default ``steps // 2``).
        power: the starting exponent ``p > 1`` (larger: more crowded).

    Returns:
        The sorted full-step indices (always containing 0).

    Raises:
        ValueError: ``steps < 1``, ``center`` outside ``[0, steps)``, ``power <= 1``, or no exponent above 1
            gives ``n`` distinct steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    center = steps // 2 if center is None else int(center)
    if not 0 <= center < steps:
        raise ValueError(f"center must lie in [0, {steps - 1}] (a step index), got {center}")
    if not power > 1:
        raise ValueError(f"power must be > 1, got {power}")
    n = math.ceil(steps / interval)
    if n >= steps:
        return list(range(steps))
    p = float(power)
    while p > 1:
        u = torch.linspace(-(center ** (1 / p)), (steps - center) ** (1 / p), n + 1, dtype=torch.float64)
        offsets = torch.unique(torch.trunc(u.sign() * u.abs() ** p).long())
        chosen = [0] + [center + int(o) for o in offsets[1:-1]]
        if len(chosen) == n and len(set(chosen)) == n:
            return sorted(chosen)
        p -= 0.02
    raise ValueError(f"no exponent in (1, {power}] spreads {n} distinct full steps over {steps} steps around "
                     f"step {center}; move center towards the middle or lower the interval")


#: full-step rules by name: ``fn(steps, interval, **options) -> sorted full-step indices``
SCHEDULES: dict[str, Callable[..., list[int]]] = {"uniform": uniform_full_steps, "quadratic": quadratic_full_steps}


@dataclass(frozen=True)
class SkipConnection:
    """One skip connection of a U-Net.

    Attributes:
        index: its number, 0 for the shallowest (``conv_in``'s output).
        producer: the module whose output it carries (``conv_in``, ``down_blocks.0.resnets.1``, …).
        consumer: the up-path resnet that concatenates it (``up_blocks.3.resnets.2``).
    """

    index: int
    producer: str
    consumer: str


def _unet(model: Any) -> nn.Module:
    """The diffusers U-Net of a backbone or the U-Net itself; refuses anything else."""
    unet = model.model if isinstance(model, Backbone) else model
    missing = [a for a in ("conv_in", "down_blocks", "up_blocks") if not hasattr(unet, a)]
    if not isinstance(unet, nn.Module) or missing:
        raise TypeError(f"DeepCache needs a diffusers U-Net (UNet2DModel, UNet2DConditionModel) or a difffeat "
                        f"backbone wrapping one, got {type(unet).__name__}"
                        + (f" (it has no {', '.join(missing)})" if isinstance(unet, nn.Module) else ""))
    return unet


def _check_block(block: nn.Module, name: str, supported: tuple[str, ...]) -> None:
    kind = type(block).__name__
    if kind not in supported:
        raise ValueError(f"{name} is a {kind}, which DeepCache does not support (its streams are not the plain "
                         f"resnet/attention/resampler sequence); supported blocks: {', '.join(supported)}")


def _layers(block: nn.Module) -> list[list[str]]:
    """Per layer of a block, its module names relative to the block: the resnet, then its attention if any."""
    attentions = getattr(block, "attentions", None) or []
    return [[f"resnets.{j}"] + ([f"attentions.{j}"] if j < len(attentions) else []) for j in range(len(block.resnets))]


def _samplers(block: nn.Module, kind: str) -> list[str]:
    return [f"{kind}.{k}" for k in range(len(getattr(block, kind, None) or []))]


def skip_connections(model: Any) -> list[SkipConnection]:
    """The skip connections of a diffusers U-Net, shallowest first (the valid ``branch`` values).

    Args:
        model: a ``UNet2DModel`` / ``UNet2DConditionModel`` or a backbone wrapping one.

    Raises:
        TypeError: not a diffusers U-Net.
        ValueError: a block type the cache does not support, or skip counts that do not pair up.
    """
    unet = _unet(model)
    producers = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        _check_block(block, f"down_blocks.{i}", DOWN_BLOCKS)
        producers += [f"down_blocks.{i}.{layer[-1]}" for layer in _layers(block)]
        samplers = _samplers(block, "downsamplers")
        if samplers:
            producers.append(f"down_blocks.{i}.{samplers[-1]}")
    consumers = []
    for i, block in enumerate(unet.up_blocks):
        _check_block(block, f"up_blocks.{i}", UP_BLOCKS)
        consumers += [f"up_blocks.{i}.resnets.{j}" for j in range(len(block.resnets))]
    if len(consumers) != len(producers):
        raise ValueError(f"the down path makes {len(producers)} skip connections but the up path consumes "
                         f"{len(consumers)}; DeepCache cannot pair them")
    return [SkipConnection(k, p, c) for k, (p, c) in enumerate(zip(producers, reversed(consumers), strict=True))]


def cached_modules(model: Any, branch: int) -> list[str]:
    """The modules a cached step skips for ``branch`` (whole blocks where every layer of a block is skipped).

    Raises:
        ValueError: ``branch`` is not a skip connection of the U-Net (the valid ones are listed).
    """
    unet = _unet(model)
    skips = skip_connections(unet)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < len(skips):
        listed = "; ".join(f"{s.index}: {s.producer} -> {s.consumer}" for s in skips)
        raise ValueError(f"unknown skip branch {branch!r}: this U-Net has skip connections 0-{len(skips) - 1} "
                         f"(0 = shallowest): {listed}")
    names = []
    index = 0  # skip index of the next producer; conv_in (index 0) always runs
    for i, block in enumerate(unet.down_blocks):
        parts = [(index + 1 + j, layer) for j, layer in enumerate(_layers(block))]
        index += len(parts)
        samplers = _samplers(block, "downsamplers")
        if samplers:
            index += 1
            parts.append((index, samplers))
        if parts[0][0] > branch:
            names.append(f"down_blocks.{i}")
        else:
            names += [f"down_blocks.{i}.{m}" for k, layer in parts if k > branch for m in layer]
    if unet.mid_block is not None:
        names.append("mid_block")
    for i, block in enumerate(unet.up_blocks):
        layers = _layers(block)
        consumed = [index - j for j in range(len(layers))]  # the skip each layer concatenates
        index -= len(layers)
        if consumed[-1] > branch:
            names.append(f"up_blocks.{i}")
        else:
            names += [f"up_blocks.{i}.{m}" for k, layer in zip(consumed, layers, strict=True) if k > branch
                      for m in layer]
    return names


def _hook_classes() -> tuple[type, type]:
    """The two diffusers ``ModelHook`` subclasses (built on first use: diffusers' hooks import torch lazily)."""
    from diffusers.hooks import ModelHook

    class StepHook(ModelHook):
        """On the U-Net: decides, per call, between a full and a cached step."""

        def __init__(self, cache: DeepCache) -> None:
            super().__init__()
            self.cache = cache

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
            sample = args[0] if args else kwargs.get("sample")
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
            self.cache._begin(sample, timestep)
            return args, kwargs

        def post_forward(self, module: nn.Module, output: Any) -> Any:
            if not self.cache._bypass:
                self.cache._complete = True
            return output

    class SkipHook(ModelHook):
        """On a deep module: its cached output on a cached step, else its own forward (kept for later)."""

        def __init__(self, cache: DeepCache, name: str) -> None:
            super().__init__()
            self.cache, self.name = cache, name

        def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.cache._cached_step:
                return self.cache._outputs[self.name]
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.cache._keep:
                self.cache._outputs[self.name] = output
            return output

    return StepHook, SkipHook


class DeepCache:
    """DeepCache feature reuse for diffusers U-Nets, attached with :meth:`attach` around a denoising loop.

    Example::

        cache = DeepCache(interval=3, branch=0)
        with cache.attach(backbone.model):
            for image in images:
                cache.reset()
                ...  # the denoising loop: one U-Net call per step

    Args:
        interval: ``N`` of the 1:N strategy: one full U-Net step per ``N`` steps (1: every step is full and
            the result is bit-identical to no cache).
        branch: the skip connection the cached feature enters (:func:`skip_connections`; 0 = shallowest,
            the fastest and least exact).
        schedule: a :data:`SCHEDULES` name: ``"uniform"`` (default) or ``"quadratic"`` (non-uniform).
        steps: denoising steps per image; needed by ``"quadratic"`` (or given to :meth:`reset`), and when
            given, a call past the last step without a reset is refused.
        center: ``"quadratic"`` only: the step the full steps crowd around (default ``steps // 2``).
        power: ``"quadratic"`` only: the starting exponent (default 1.4).
        last_full: also run the last step of each trajectory in full (needs ``steps``, here or in
            :meth:`reset`), so features read from it (a detection adapter's) are that step's own and not
            the cached ones of an earlier step. Not in the paper: difffeat's option for feature readers.

    Raises:
        ValueError: ``interval < 1`` or not an integer, a negative or non-integer ``branch``, options given to
            ``"uniform"``, or ``"quadratic"`` / ``last_full`` without ``steps``.
        KeyError: an unknown schedule, listing the valid ones.
    """

    def __init__(self, interval: int = 3, branch: int = 0, schedule: str = "uniform", steps: int | None = None,
                 center: int | None = None, power: float | None = None, last_full: bool = False) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = no caching), got {interval!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise ValueError(f"branch must be a skip-connection index >= 0 (0 = shallowest), got {branch!r}")
        if schedule not in SCHEDULES:
            raise KeyError(f"unknown cache schedule {schedule!r}; valid: {', '.join(map(repr, SCHEDULES))}")
        self.options = {k: v for k, v in (("center", center), ("power", power)) if v is not None}
        if schedule == "uniform" and self.options:
            raise ValueError(f"center and power belong to the 'quadratic' schedule, not {schedule!r}")
        self.interval, self.branch, self.schedule, self.last_full = interval, branch, schedule, bool(last_full)
        self._unet: nn.Module | None = None
        self._outputs: dict[str, Any] = {}
        self.steps: int | None = None
        self._bypass = 0
        #: full and cached U-Net calls since :meth:`attach` (over every image)
        self.stats = {"full": 0, "cached": 0}
        self.reset(steps)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        last = ", last_full=True" if self.last_full else ""
        return (f"DeepCache(interval={self.interval}, branch={self.branch}, schedule={self.schedule!r}, "
                f"steps={self.steps}{options}{last})")

    def config(self) -> dict[str, Any]:
        """The settings, for store keys and reports."""
        return {"interval": self.interval, "branch": self.branch, "schedule": self.schedule, **self.options,
                **({"last_full": True} if self.last_full else {})}

    def reset(self, steps: int | None = None) -> None:
        """Forgets the cached features and restarts the step count: call it before each image (or batch).

        Args:
            steps: the number of denoising steps of the next trajectory (img2img runs fewer); default: the
                one given before.

        Raises:
            ValueError: a schedule that needs ``steps`` has none, or ``steps < 1``.
        """
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
            self.steps = steps
        if self.steps is None and self.schedule != "uniform":
            raise ValueError(f"the {self.schedule!r} schedule places its full steps over the whole trajectory: "
                             f"give steps= to DeepCache or to reset()")
        if self.steps is None and self.last_full:
            raise ValueError("last_full needs to know the last step: give steps= to DeepCache or to reset()")
        self._full = None if self.steps is None else set(self.full_steps())
        self._outputs.clear()
        self._step = 0
        self._last_timestep: float | None = None
        self._shape: tuple[int, ...] | None = None
        self._complete = False
        self._cached_step = False
        self._keep = False

    def full_steps(self, steps: int | None = None) -> list[int]:
        """The full-step indices of a trajectory of ``steps`` steps (default: the configured number)."""
        steps = self.steps if steps is None else steps
        if steps is None:
            raise ValueError("give the number of steps")
        full = SCHEDULES[self.schedule](steps, self.interval, **self.options)
        return sorted({*full, steps - 1}) if self.last_full else full

    def _is_full(self, step: int) -> bool:
        return step % self.interval == 0 if self._full is None else step in self._full

    @contextmanager
    def bypass(self) -> Iterator[None]:
        """U-Net calls inside this block run uncached and leave the cache and the step count alone.

        For forwards that are not denoising steps: a probe (:attr:`~difffeat.backbones.base.Backbone.feature_info`
        on first use), features read at another timestep.
        """
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    def _begin(self, sample: Any, timestep: Any) -> None:
        """Called before every U-Net forward: checks the call and picks a full or cached step."""
        if self._bypass:
            self._cached_step = self._keep = False
            return
        if self.steps is not None and self._step >= self.steps:
            raise RuntimeError(f"U-Net call {self._step + 1} after {self.steps} steps: call cache.reset() "
                               f"before each image (or pass its number of steps to reset)")
        t = float(torch.as_tensor(timestep).max()) if timestep is not None else None
        if t is not None and self._last_timestep is not None and t > self._last_timestep:
            raise RuntimeError(f"timestep {t:g} after {self._last_timestep:g}: a new trajectory started without "
                               f"cache.reset(), and the cache still holds the last one's features")
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
        full = self._is_full(self._step) or not self._complete
        if not full and shape != self._shape:
            raise ValueError(f"a cached step got input of shape {shape}, but the cached features belong to a "
                             f"batch of shape {self._shape}: call cache.reset() between batches")
        self._cached_step = not full
        self._keep = full and self.interval > 1
        if full:
            self._complete = False  # until this forward finishes
            self._shape = shape
        self.stats["full" if full else "cached"] += 1
        self._step += 1
        self._last_timestep = t

    @contextmanager
    def attach(self, model: Any) -> Iterator[DeepCache]:
        """Wraps the U-Net's deep modules for the duration of the ``with`` block.

        The cache is reset on entry and emptied on exit; :attr:`stats` counts the full and cached calls made
        inside the block.

        Args:
            model: a ``UNet2DModel`` / ``UNet2DConditionModel`` or a difffeat backbone wrapping one.

        Yields:
            This cache.

        Raises:
            TypeError: not a diffusers U-Net.
            ValueError: an unknown skip branch (the valid ones are listed) or an unsupported block type.
            RuntimeError: the cache is already attached, or the U-Net already carries a DeepCache.
        """
        from diffusers.hooks import HookRegistry

        unet = _unet(model)
        names = cached_modules(unet, self.branch)
        if self._unet is not None:
            raise RuntimeError("this DeepCache is already attached to a U-Net; leave that `with` block first")
        if any(HOOK_NAME in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) for m in unet.modules()):
            raise RuntimeError("the U-Net already carries a DeepCache; one cache per U-Net at a time")
        step_hook, skip_hook = _hook_classes()
        targets = [(unet, step_hook(self))] + [(unet.get_submodule(n), skip_hook(self, n)) for n in names]
        attached: list[tuple[nn.Module, bool, bool]] = []
        self.reset()
        self.stats = {"full": 0, "cached": 0}
        self._unet = unet
        try:
            for module, hook in targets:
                had_registry, had_forward = hasattr(module, "_diffusers_hook"), "forward" in vars(module)
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
                attached.append((module, had_registry, had_forward))
            yield self
        finally:
            for module, had_registry, had_forward in reversed(attached):
                registry = module._diffusers_hook
                registry.remove_hook(HOOK_NAME, recurse=False)
                if not had_registry and not registry.hooks:
                    del module._diffusers_hook
                own = vars(module).get("forward")
                if not had_forward and getattr(own, "__func__", None) is type(module).forward:
                    del module.forward  # the registry leaves the bound method behind as an instance attribute
            self._unet = None
            self.reset()
