"""The adapter every diffusion-network family implements.

An adapter wraps a diffusers model without copying its ``forward``: intermediate activations are
read by removable forward hooks, and the forward stops early by raising a private signal from the
hook on the deepest requested tap. diffusers releases can change the body of ``forward`` freely; only
module names matter here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.noise import NoiseSchedule

__all__ = ["LOAD_KWARGS", "Backbone", "FeatureInfo", "check_images"]

#: how every diffusers model is loaded: never from the network; plain loading (the low-memory path needs
#: the optional ``accelerate`` package and only matters for checkpoints larger than RAM)
LOAD_KWARGS = {"local_files_only": True, "low_cpu_mem_usage": False}


@dataclass(frozen=True)
class FeatureInfo:
    """What one tap produces.

    Attributes:
        name: stable tap name, the module path inside the diffusers model (``up_blocks.1``).
        channels: channels of a map, or width of a token.
        stride: input pixels (or latent cells) per feature cell; ``None`` for tokens.
        grid: token grid ``(h, w)`` for token outputs; ``None`` for maps.
        kind: ``"map"`` for ``(B, C, H, W)`` outputs, ``"tokens"`` for ``(B, N, D)``.
        order: position in execution order (0 runs first); the extractor stops after the largest.
    """

    name: str
    channels: int
    stride: int | None
    grid: tuple[int, int] | None
    kind: str
    order: int


def _schedule(scheduler: Any, default: dict[str, Any]) -> NoiseSchedule:
    """A :class:`NoiseSchedule` from a diffusers scheduler, a config dict, or the adapter's default."""
    if isinstance(scheduler, NoiseSchedule):
        return scheduler
    if scheduler is None or isinstance(scheduler, dict):
        return NoiseSchedule.from_config(default if scheduler is None else scheduler)
    return NoiseSchedule.from_scheduler(scheduler)


class _StopForward(Exception):
    """Raised by the hook on the deepest tap to end the forward early (never escapes ``tap``)."""


def _as_tensor(output: Any) -> torch.Tensor:
    """The hidden state of a block's output: blocks return tensors, tuples or output dataclasses."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return _as_tensor(output[0])
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"cannot read a tensor from a module output of type {type(output).__name__}")


def check_images(x: torch.Tensor, channels: int, what: str = "images") -> None:
    """Raises a clear error for a batch that is not ``(B, channels, H, W)`` of finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{what} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} have {x.shape[1]} channels (shape {tuple(x.shape)}), but the backbone "
                         f"expects {channels}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{what} contain NaN or Inf values (batch rows {bad[:10]})")


class Backbone(nn.Module):
    """A diffusion denoiser seen as a bank of named feature taps.

    Subclasses set ``tap_names`` (the module paths offered as taps) and implement :meth:`denoise`.

    Args:
        model: the diffusers denoiser (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``).
        schedule: its training noise schedule.
        vae: optional diffusers ``AutoencoderKL``; when given, images are encoded to latents with the
            posterior *mean* (not a sample, so features are deterministic) times ``scaling_factor``.
        name: a label used in store keys and reports.
        pipeline_dir: the diffusers pipeline folder the model came from, if any (adapters may read
            extra files there).
    """

    #: the model's diffusers class name, the adapter registry's key
    model_class: str = ""
    #: the noise schedule assumed when a checkpoint ships no scheduler config
    default_scheduler: dict[str, Any] = {}  # noqa: RUF012 (read-only class default)

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, vae: nn.Module | None = None,
                 name: str = "", pipeline_dir: str | Path | None = None) -> None:
        super().__init__()
        self.pipeline_dir = Path(pipeline_dir) if pipeline_dir is not None else None
        self.model = model
        self.vae = vae
        self.schedule = schedule
        self.name = name or type(model).__name__
        self.selfcond: nn.Module | None = None
        self._feature_info: dict[str, FeatureInfo] | None = None

    def set_self_conditioning(self, selfcond: nn.Module | None) -> Backbone:
        """Attaches (or, with ``None``, removes) a :class:`~difffeat.selfcond.SelfConditioning`, bound to
        this model; it is active in every :meth:`forward`."""
        self.selfcond = selfcond.bind(self.model) if selfcond is not None and selfcond.mlp is None else selfcond
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The denoiser's prediction, with self-conditioning when attached."""
        if self.selfcond is None:
            return self.denoise(x_t, t, cond)
        with self.selfcond.hooks(self.model):
            return self.denoise(x_t, t, cond)

    @classmethod
    def diffusers_class(cls) -> type[nn.Module]:
        """The diffusers model class this adapter wraps."""
        import diffusers

        return getattr(diffusers, cls.model_class)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, scheduler: Any = None, **kwargs: Any) -> Backbone:
        """Loads the model from a local diffusers model folder (never from the network)."""
        model = cls.diffusers_class().from_pretrained(model_dir, **LOAD_KWARGS)
        return cls(model, _schedule(scheduler, cls.default_scheduler), **kwargs)

    @classmethod
    def from_config(cls, config: dict[str, Any], scheduler: Any = None, seed: int = 0,
                    **kwargs: Any) -> Backbone:
        """Builds a randomly initialised model (seeded) from a diffusers config dict."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls.diffusers_class().from_config(config)
        return cls(model, _schedule(scheduler, cls.default_scheduler), **kwargs)

    # ----------------------------------------------------------------- what subclasses provide
    def tap_names(self) -> list[str]:
        """Module paths (relative to ``self.model``) offered as taps."""
        raise NotImplementedError

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """One call of the denoiser on noisy latents ``x_t`` at integer timesteps ``t``."""
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        """Channels the denoiser takes."""
        return int(self.model.config.in_channels)

    @property
    def latent_size(self) -> int:
        """The spatial size the denoiser was trained at (latent cells for latent models)."""
        size = self.model.config.sample_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    # ----------------------------------------------------------------- shared machinery
    @property
    def image_channels(self) -> int:
        """Channels of the images the user passes (3 for a latent model with an RGB VAE)."""
        return int(self.vae.config.in_channels) if self.vae is not None else self.latent_channels

    @property
    def image_size(self) -> int:
        """The image size matching :attr:`latent_size`."""
        if self.vae is None:
            return self.latent_size
        return self.latent_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (in ``[-1, 1]``) to the denoiser's input space; checks shape and values first."""
        check_images(images, self.image_channels)
        if self.vae is None:
            return images
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    def modules_by_name(self, names: Sequence[str]) -> dict[str, nn.Module]:
        """The tap modules for ``names``; an unknown name is a ``KeyError`` listing the valid ones."""
        valid = list(self.feature_info)
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise KeyError(f"unknown layer(s) {unknown} for {self.name}; valid layers: {valid}")
        return {n: self.model.get_submodule(n) for n in names}

    @contextmanager
    def tap(self, names: Sequence[str], stop_early: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Registers hooks that record the outputs of ``names`` into the yielded dict.

        With ``stop_early`` the hook on the last tap to run raises a stop signal, so the rest of the
        network is skipped; call the model through :meth:`run` to have it caught. Hooks are removed on
        exit, also after an error.
        """
        modules = self.modules_by_name(names)
        last = max(names, key=lambda n: self.feature_info[n].order) if stop_early and names else None
        found: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                found[name] = _as_tensor(output)
                if name == last and len(found) == len(modules):
                    raise _StopForward

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
        try:
            yield found
        finally:
            for h in handles:
                h.remove()

    def run(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor | None:
        """Calls :meth:`forward`, returning ``None`` where a tap stopped the forward early."""
        try:
            return self(x_t, t, cond)
        except _StopForward:
            return None

    @property
    def feature_info(self) -> dict[str, FeatureInfo]:
        """Channels, stride or token grid and execution order of every tap, found by one probe forward."""
        if self._feature_info is None:
            self._feature_info = self._probe_feature_info()
        return self._feature_info

    @torch.no_grad()
    def _probe_feature_info(self) -> dict[str, FeatureInfo]:
        names = self.tap_names()
        modules = {n: self.model.get_submodule(n) for n in names}
        seen: dict[str, torch.Tensor] = {}
        order: list[str] = []

        def make_hook(name: str):
            def hook(_m: nn.Module, _i: Any, output: Any) -> None:
                seen[name] = _as_tensor(output)
                order.append(name)

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
        try:
            param = next(self.model.parameters())
            size = self.latent_size
            x = torch.zeros(1, self.latent_channels, size, size, device=param.device, dtype=param.dtype)
            self(x, torch.zeros(1, dtype=torch.long, device=param.device))
        finally:
            for h in handles:
                h.remove()
        info = {}
        for name in names:
            if name not in seen:  # a module that exists but is not run (e.g. unused upsampler)
                continue
            out = seen[name]
            rank = order.index(name)
            if out.ndim == 4:
                info[name] = FeatureInfo(name, out.shape[1], self.latent_size // out.shape[-1], None, "map", rank)
            elif out.ndim == 3:
                info[name] = FeatureInfo(name, out.shape[-1], None, self.token_grid(out.shape[1]), "tokens", rank)
        return dict(sorted(info.items(), key=lambda kv: kv[1].order))

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The ``(h, w)`` grid of a token sequence at the probe size (square inputs)."""
        side = round(num_tokens**0.5)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens do not form a square grid")
        return side, side

    def weights_digest(self) -> str:
        """SHA-256 over every parameter and buffer (names, shapes, dtypes, bytes): the store's model key."""
        h = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            v = value.detach().cpu().contiguous()
            h.update(f"{key}:{tuple(v.shape)}:{v.dtype}".encode())
            h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        return h.hexdigest()
