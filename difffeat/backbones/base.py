"""The adapter every diffusion-network family implements.

An adapter wraps a diffusers model without copying its ``forward``: intermediate activations are
read by removable forward hooks, and the forward stops early by raising a private signal from the
hook on the deepest requested tap. diffusers releases can change the body of ``forward`` freely; only
module names matter here. Besides the adapter's own taps, every diffusers attention module offers its
queries, keys, values and attention maps (:class:`~difffeat.backbones.attention.AttentionTaps`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difffeat.digest import tensor_digest
from difffeat.noise import NoiseSchedule

__all__ = ["LOAD_KWARGS", "Backbone", "FeatureInfo", "check_images", "to_model_range"]

#: how every diffusers model is loaded: never from the network; plain loading (the low-memory path needs
#: the optional ``accelerate`` package and only matters for checkpoints larger than RAM)
LOAD_KWARGS = {"local_files_only": True, "low_cpu_mem_usage": False}


@dataclass(frozen=True)
class FeatureInfo:
    """What one tap produces.

    Attributes:
        name: stable tap name, the module path inside the diffusers model (``up_blocks.1``), or an
            attention module's path and part (``….attn2.q``, ``….attn2.map``; see :meth:`Backbone.tap`).
        channels: channels of a map, width of a token, or the key count ``Nk`` of an attention map.
        stride: input pixels (or latent cells) per feature cell; ``None`` for tokens and attention maps.
        grid: token grid ``(h, w)`` for token outputs (the queries' grid for attention maps); ``None`` for
            maps and for tokens that fill no grid (a cross-attention's text keys).
        kind: ``"map"`` for ``(B, C, H, W)`` outputs, ``"tokens"`` for ``(B, N, D)``, ``"attention"`` for
            head-mean attention probabilities ``(B, Nq, Nk)``, ``"attention_heads"`` for ``(B, heads, Nq, Nk)``.
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


def _as_tensor(output: Any, stream: int = 0) -> torch.Tensor:
    """One hidden state of a block's output.

    Blocks return tensors, tuples or output dataclasses; for a tuple, ``stream`` says which element
    (joint text-image blocks return ``(text, image)``).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        if not -len(output) <= stream < len(output):
            raise IndexError(f"stream {stream} asked of a block output with {len(output)} elements")
        return _as_tensor(output[stream])
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"cannot read a tensor from a module output of type {type(output).__name__}")


def to_model_range(x: torch.Tensor, input_range: tuple[float, float]) -> torch.Tensor:
    """Maps values in ``input_range`` (``(0, 1)``, ``(0, 255)``, …) linearly onto ``[-1, 1]``."""
    lo, hi = (float(v) for v in input_range)
    if not hi > lo:
        raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}")
    return (x.float() - lo) * (2.0 / (hi - lo)) - 1.0


#: how far outside ``[-1, 1]`` image values may stray (resampling overshoot) before they are refused
RANGE_TOLERANCE = 1e-2


def check_images(x: Any, channels: int, what: str = "images", value_range: tuple[float, float] | None = (-1, 1)
                 ) -> None:
    """Raises a clear error, before any work, for a batch the backbone cannot take.

    Args:
        x: the batch, expected ``(B, channels, H, W)`` floating point.
        channels: the channel count the backbone expects.
        what: how the batch is named in messages.
        value_range: the expected value range (``None`` for latents, which have none).

    Raises:
        TypeError: not a tensor (a NumPy array, a list) or not floating point (``uint8`` images).
        ValueError: an empty batch, not 4-D, channels last, the wrong channel count, NaN/Inf values, or
            values outside ``value_range``.
    """
    if not isinstance(x, torch.Tensor):
        hint = " (convert with torch.from_numpy(a).permute(0, 3, 1, 2) for HWC arrays)" if hasattr(x, "shape") else ""
        raise TypeError(f"{what} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"{what} have dtype {x.dtype}; expected floating point in [-1, 1]. Convert uint8 images "
                        f"with x.float() / 127.5 - 1, or pass input_range=(0, 255) to the extractor")
    if x.ndim != 4:
        raise ValueError(f"{what} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} are an empty batch (shape {tuple(x.shape)}); give at least one image")
    if x.shape[1] != channels:
        hint = (" — they look channels-last (B, H, W, C): use x.permute(0, 3, 1, 2)"
                if x.shape[-1] == channels else "")
        raise ValueError(f"{what} have {x.shape[1]} channels (shape {tuple(x.shape)}), but the backbone "
                         f"expects {channels}{hint}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{what} contain NaN or Inf values (batch rows {bad[:10]})")
    if value_range is not None:
        lo, hi = value_range
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < lo - RANGE_TOLERANCE or x_max > hi + RANGE_TOLERANCE:
            guess = "(0, 255)" if x_max > 2 else "(0, 1)"
            raise ValueError(f"{what} have values in [{x_min:.3g}, {x_max:.3g}], but the backbone expects "
                             f"[{lo}, {hi}]; rescale them, or pass input_range={guess} to the extractor")


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
    #: which element a tap reads where a block returns several streams, by tap-name prefix (the longest
    #: matching prefix wins; default element 0). A joint text-image block returning ``(text, image)``
    #: sets ``{"transformer_blocks": 1}``.
    output_streams: dict[str, int] = {}  # noqa: RUF012 (read-only class default)

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, vae: nn.Module | None = None,
                 name: str = "", pipeline_dir: str | Path | None = None) -> None:
        super().__init__()
        self.pipeline_dir = Path(pipeline_dir) if pipeline_dir is not None else None
        self.model = model
        self.vae = vae
        self.schedule = schedule
        self.name = name or type(model).__name__
        self.selfcond: nn.Module | None = None
        #: ``"images"`` (pixels or VAE input, checked to lie in ``[-1, 1]``) or ``"latents"`` (a latent
        #: denoiser used without its VAE: no range). Pixel denoisers have 1 or 3 channels.
        self.inputs = "images" if vae is not None or self.latent_channels in (1, 3) else "latents"
        self._feature_info: dict[str, FeatureInfo] | None = None

    def set_self_conditioning(self, selfcond: nn.Module | None) -> Backbone:
        """Attaches (or, with ``None``, removes) a :class:`~difffeat.selfcond.SelfConditioning`.

        It is bound to this model and active in every :meth:`forward`.

        Returns:
            This backbone.
        """
        self.selfcond = selfcond.bind(self.model) if selfcond is not None and selfcond.mlp is None else selfcond
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The denoiser's prediction, with self-conditioning when attached."""
        if self.selfcond is None:
            return self.denoise(x_t, t, cond)
        with self.selfcond.hooks(self.model):
            return self.denoise(x_t, t, cond)

    @classmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        """Whether this adapter takes a model of :attr:`model_class` with ``config`` (default: every one).

        Adapters sharing a diffusers class (SD-1/2 and SDXL U-Nets) split its configs between them.
        """
        return True

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
        """Builds a randomly initialised model (seeded) from a diffusers config dict.

        Raises:
            ValueError: a config this adapter does not take (:meth:`accepts`).
        """
        if not cls.accepts(config):
            raise ValueError(f"{cls.__name__} does not take this {cls.model_class} config; "
                             f"create_backbone picks the adapter for a folder's config")
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
        """Images (in ``[-1, 1]``) to the denoiser's input space; checks shape and values first.

        With a VAE: ``(mean - shift_factor) · scaling_factor`` of the posterior (its mode, so features are
        deterministic), ``shift_factor`` 0 where the VAE config has none (SD-1/2, SDXL) — the inverse of the
        pipelines' decoding ``latents / scaling_factor + shift_factor`` (SD3, Flux).
        """
        check_images(images, self.image_channels, value_range=(-1, 1) if self.inputs == "images" else None)
        if self.vae is None:
            return images
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def _attention_modules(self) -> dict[str, nn.Module]:
        from difffeat.backbones.attention import attention_modules

        return attention_modules(self.model)

    def modules_by_name(self, names: Sequence[str]) -> dict[str, nn.Module]:
        """The modules whose hooks read ``names``.

        A tap's own module, and for an attention tap (``<attention>.q`` …, see :meth:`tap`) the projection
        it reads (``to_q``, ``to_k``, ``to_v``) or, for ``map`` / ``map_heads``, the attention module.

        Raises:
            KeyError: an unknown name, listing the valid ones (attention taps summarised).
            ValueError: an attention map that is not offered (its module applies rotary embeddings).
        """
        from difffeat.backbones.attention import split_attention_tap

        valid = self.feature_info
        refused = [n for n in names if n in getattr(self, "_refused_taps", {})]
        if refused:
            raise ValueError(self._refused_taps[refused[0]])
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise KeyError(f"unknown layer(s) {unknown} for {self.name}; valid layers: {self._valid_summary()}")
        attentions = self._attention_modules()
        modules = {}
        for n in names:
            split = split_attention_tap(n, attentions)
            if split is None:
                modules[n] = self.model.get_submodule(n)
            else:
                path, part = split
                modules[n] = attentions[path] if part.startswith("map") else getattr(attentions[path], f"to_{part}")
        return modules

    #: how many plain tap names an unknown-layer error lists before it shortens the list
    MAX_LISTED_TAPS = 60

    def _valid_summary(self) -> str:
        """The valid tap names for an error message: plain taps listed, attention taps summarised."""
        from difffeat.backbones.attention import ATTENTION_PARTS, split_attention_tap

        attentions = self._attention_modules()
        plain, paths = [], []
        for n in self.feature_info:
            split = split_attention_tap(n, attentions)
            if split is None:
                plain.append(n)
            elif split[0] not in paths:
                paths.append(split[0])
        text = str(plain[:self.MAX_LISTED_TAPS])
        if len(plain) > self.MAX_LISTED_TAPS:
            text += f" and {len(plain) - self.MAX_LISTED_TAPS} more"
        if paths:
            example = paths[0] if len(paths) == 1 else f"{paths[0]} … {paths[-1]}"
            text += (f"; attention taps <attention>.{{{','.join(ATTENTION_PARTS)}}} for {len(paths)} attention "
                     f"module(s) ({example}); backbone.feature_info lists them all")
        return text

    @contextmanager
    def tap(self, names: Sequence[str], stop_early: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Registers hooks that record the outputs of ``names`` into the yielded dict.

        With ``stop_early`` the hook on the last tap to run raises a stop signal, so the rest of the
        network is skipped; call the model through :meth:`run` to have it caught. Hooks are removed on
        exit, also after an error.

        Attention taps (``<attention path>.q``, ``.k``, ``.v``, ``.map``, ``.map_heads`` for every diffusers
        attention module of the model, e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2.map``) are
        read by :class:`~difffeat.backbones.attention.AttentionTaps`: projections as tokens ``(B, N, D)``,
        ``map`` as head-mean probabilities ``(B, Nq, Nk)`` (FeatureInfo kind ``"attention"``, channels
        ``Nk``, grid the queries' token grid, so :class:`~difffeat.readout.Identity` folds it to
        ``(B, Nk, h, w)``: each key's attention over the image, and ``GlobalAvg`` gives the mean attention
        each key receives), ``map_heads`` as ``(B, heads, Nq, Nk)`` (kind ``"attention_heads"``; read it
        with ``Identity()``, which passes it through unchanged). A map costs ``4·B·Nq·Nk`` bytes
        (``·heads`` for ``map_heads``) and is refused above
        :data:`~difffeat.backbones.attention.MAP_MEMORY_LIMIT`.
        """
        from difffeat.backbones.attention import AttentionTaps, split_attention_tap

        self.modules_by_name(names)  # validates every name
        unique = list(dict.fromkeys(names))
        attentions = self._attention_modules()
        virtual = [n for n in unique if split_attention_tap(n, attentions) is not None]
        plain = [n for n in unique if n not in virtual]
        last = max(unique, key=lambda n: self.feature_info[n].order) if stop_early and unique else None
        found: dict[str, torch.Tensor] = {}

        def record(name: str, tensor: torch.Tensor) -> None:
            found[name] = tensor
            if name == last and len(found) == len(unique):
                raise _StopForward

        def make_hook(name: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                record(name, self.read_output(name, output))

            return hook

        handles = [self.model.get_submodule(n).register_forward_hook(make_hook(n)) for n in plain]
        try:
            with AttentionTaps(attentions, virtual, record).hooks():
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
        """One forward at the trained size with hooks on every tap and every attention module's parts.

        Attention maps are probed as shapes only (``meta`` tensors), so the probe allocates no ``N²`` map.
        """
        from difffeat.backbones.attention import ATTENTION_PARTS, AttentionTaps, rotary_refusal

        names = self.tap_names()
        modules = {n: self.model.get_submodule(n) for n in names}
        attentions = self._attention_modules()
        virtual = [f"{path}.{part}" for path in attentions for part in ATTENTION_PARTS]
        seen: dict[str, torch.Tensor] = {}
        first: dict[str, int] = {}

        def record(name: str, tensor: torch.Tensor) -> None:
            seen[name] = tensor
            first.setdefault(name, len(first))

        def make_hook(name: str):
            def hook(_m: nn.Module, _i: Any, output: Any) -> None:
                record(name, self.read_output(name, output))

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
        probe = AttentionTaps(attentions, virtual, record, probe=True)
        try:
            with probe.hooks():
                param = next(self.model.parameters())
                size = self.latent_size
                x = torch.zeros(1, self.latent_channels, size, size, device=param.device, dtype=param.dtype)
                self(x, torch.zeros(1, dtype=torch.long, device=param.device))
        finally:
            for h in handles:
                h.remove()
        self._refused_taps = {f"{p}.{part}": rotary_refusal(p) for p in probe.rotary for part in ("map", "map_heads")}
        info = {}
        for name in names:
            if name not in seen:  # a module that exists but is not run (e.g. unused upsampler)
                continue
            out = seen[name]
            rank = first[name]
            if out.ndim == 4:
                info[name] = FeatureInfo(name, out.shape[1], self.latent_size // out.shape[-1], None, "map", rank)
            elif out.ndim == 3:
                info[name] = FeatureInfo(name, out.shape[-1], None, self.token_grid(out.shape[1]), "tokens", rank)
        for name in virtual:
            if name in seen and name not in self._refused_taps and name not in info:
                info[name] = self._attention_info(name, seen, attentions, first[name])
        return dict(sorted(info.items(), key=lambda kv: kv[1].order))

    def _attention_info(self, name: str, seen: dict[str, torch.Tensor], attentions: dict[str, nn.Module],
                        rank: int) -> FeatureInfo:
        """FeatureInfo of an attention tap: tokens for ``q`` / ``k`` / ``v``, ``Nk`` channels for maps.

        The grid is the queries' token grid where their count fills one; keys and values share it only in
        a self-attention (a cross-attention's keys are text tokens: no grid).
        """
        path, _, part = name.rpartition(".")
        out = seen[name]
        query = seen.get(f"{path}.q")
        grid = self._grid_or_none(query.shape[1]) if query is not None else None
        if part in ("k", "v") and (getattr(attentions[path], "is_cross_attention", False) or query is None
                                   or out.shape[1] != query.shape[1]):
            grid = None
        kind = {"map": "attention", "map_heads": "attention_heads"}.get(part, "tokens")
        return FeatureInfo(name, int(out.shape[-1]), None, grid, kind, rank)

    def _grid_or_none(self, num_tokens: int) -> tuple[int, int] | None:
        """:meth:`token_grid` where it gives a grid of exactly ``num_tokens`` cells, else ``None``."""
        try:
            h, w = self.token_grid(num_tokens)
        except ValueError:
            return None
        return (h, w) if h * w == num_tokens else None

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The ``(h, w)`` grid of a token sequence at the probe size (square inputs)."""
        side = round(num_tokens**0.5)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens do not form a square grid")
        return side, side

    def read_output(self, name: str, output: Any) -> torch.Tensor:
        """The tensor tap ``name`` reads from its module's output (the stream :attr:`output_streams` names)."""
        prefixes = [p for p in self.output_streams if name == p or name.startswith(p + ".")]
        return _as_tensor(output, self.output_streams[max(prefixes, key=len)] if prefixes else 0)

    def weights_digest(self) -> str:
        """SHA-256 over every parameter and persistent buffer (names, shapes, dtypes, bytes)."""
        return tensor_digest(self.state_dict())

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Per-image text prompts as the denoiser's condition (adapters of text-conditioned models override it).

        Raises:
            TypeError: this backbone takes no text condition.
        """
        raise TypeError(f"{self.name} ({type(self.model).__name__}) is not text-conditioned: it takes no prompts")

    def condition_spec(self) -> dict[str, Any]:
        """The fixed condition the denoiser sees when none is passed (class label, prompt embedding).

        Adapters with one override this; the base returns ``{}``.
        """
        return {}

    def spec(self) -> dict[str, Any]:
        """A complete, declarative description of everything about the backbone that changes a feature.

        The denoiser's weights, its fixed condition (:meth:`condition_spec`, which covers non-persistent
        buffers such as a prompt embedding), the noise schedule, the VAE (weights, scaling and shift) and
        the attached plug-ins (their configs and weights), the compute dtype and the input convention.
        Feature-store keys are built from it, so two backbones with equal specs give equal features.
        """
        param = next(self.model.parameters())
        vae = None
        if self.vae is not None:
            cfg = self.vae.config
            vae = {"class": type(self.vae).__name__, "weights": tensor_digest(self.vae.state_dict()),
                   "scaling_factor": cfg.get("scaling_factor"), "shift_factor": cfg.get("shift_factor"),
                   "dtype": str(next(self.vae.parameters()).dtype)}
        plugins = {}
        for child_name, child in self.named_children():
            if child_name in ("model", "vae") or child is None:
                continue
            config = child.config() if callable(getattr(child, "config", None)) else {}
            plugins[child_name] = {"class": type(child).__name__, "config": config,
                                   "weights": tensor_digest(child.state_dict())}
        return {"adapter": type(self).__name__, "model_class": type(self.model).__name__,
                "weights": tensor_digest(self.model.state_dict()), "dtype": str(param.dtype),
                "condition": self.condition_spec(), "schedule": self.schedule.spec(), "vae": vae,
                "plugins": plugins, "inputs": self.inputs}
