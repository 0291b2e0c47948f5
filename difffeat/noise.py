"""Noising and timestep conventions, kept in one place.

difffeat speaks of two timestep conventions and converts between them nowhere else:

* **Discrete DDPM index** ``t ∈ {0, …, T-1}`` (``T = num_train_timesteps``, 1000 for every common
  checkpoint). ``t = 0`` is the *least* noisy level (ᾱ₀ = 1 - β₀ ≈ 0.9999, visually clean) and noise
  grows with ``t``. This is the index a diffusers UNet or DiT receives as ``timestep`` and the one
  ``FeatureExtractor(timesteps=[...])`` takes.
* **Continuous** ``t ∈ [0, 1]`` for interpolant (flow / SiT) objectives, where ``t = 0`` is data and
  ``t = 1`` is pure noise: ``x_t = (1 - t) x + t ε``.

A noise rule (:data:`NOISE_RULES`) says where the noised input ``x_t`` of a sample comes from. The two
random rules (:data:`RANDOM_NOISE_RULES`) draw noise per sample from a generator seeded by ``(seed,
sample key, ensemble member)``, so a sample's features never depend on the batch it happens to be in nor
on the order of the data; they differ in the sample key:

* ``"index"`` (default): the sample's dataset index. Features are reproducible given the dataset order;
  the same image at two indices gets two noise draws.
* ``"content"``: a hash of the image's bytes (:func:`content_keys`). The same image gets the same noise
  wherever it appears, which episodic evaluation needs: an image that is a support in one episode and a
  query in another, or seen in several batches, must not change features with the episode.

The third rule draws no noise at all:

* ``"ddim_inversion"``: ``x_t`` is the clean latent carried deterministically up to ``t`` by the
  backbone's own probability-flow ODE (:func:`ddim_invert`): DDIM inversion for ε / v / x0 prediction,
  Euler integration from ``σ = 0`` upward for flow models. The noise is then the one the model itself
  "sees" in the image; the same image gets the same ``x_t`` wherever it appears, and an ensemble of
  draws means nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "INVERSION_PREDICTION_TYPES",
    "NOISE_RULES",
    "RANDOM_NOISE_RULES",
    "FlowSchedule",
    "NoiseSchedule",
    "content_keys",
    "ddim_invert",
    "flow_interpolate",
    "inversion_grid",
    "sample_seed",
    "seeded_noise",
]


class NoiseSchedule:
    """The forward (noising) process of a discrete DDPM-style model.

    Args:
        alphas_cumprod: ᾱ_t for ``t = 0 … T-1`` (a 1-D tensor, decreasing).
        prediction_type: what the network predicts (``"epsilon"``, ``"v_prediction"`` or ``"sample"``);
            kept so training and sampling agree with the checkpoint.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of length >= 2, got shape "
                             f"{tuple(alphas_cumprod.shape)}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """The schedule of a diffusers scheduler.

        A flow-matching one gives a :class:`FlowSchedule`, any scheduler exposing ``alphas_cumprod``
        (DDPM, DDIM, …) a discrete one.
        """
        if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            cfg = scheduler.config
            dynamic = None
            if cfg.get("use_dynamic_shifting", False):
                dynamic = {k: cfg[k] for k in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")}
            return FlowSchedule(cfg.num_train_timesteps, shift=float(cfg.get("shift", 1.0)), dynamic=dynamic)
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod and is not a flow-matching "
                            f"scheduler; difffeat cannot tell how it noises")
        return cls(scheduler.alphas_cumprod.clone(), scheduler.config.get("prediction_type", "epsilon"))

    @classmethod
    def from_config(cls, config: dict | None = None) -> NoiseSchedule:
        """The schedule of the scheduler a config dict names in ``_class_name``.

        The default class is ``DDPMScheduler``; diffusers defaults fill any missing key.
        """
        import diffusers

        config = dict(config or {})
        scheduler_cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"))
        return cls.from_scheduler(scheduler_cls.from_config(config))

    @property
    def num_train_timesteps(self) -> int:
        """``T``: timesteps are the integers ``0 … T-1``."""
        return len(self.alphas_cumprod)

    def spec(self) -> dict[str, Any]:
        """What about the schedule changes a feature: its kind, prediction type and every ᾱ_t (digest)."""
        from difffeat.digest import tensor_digest

        return {"kind": "ddpm", "prediction_type": self.prediction_type,
                "alphas_cumprod": tensor_digest(self.alphas_cumprod)}

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network receives for index ``t``: the index itself for DDPM models."""
        return t

    def validate(self, timesteps: Sequence[int]) -> list[int]:
        """Checks that every timestep is an integer index in ``[0, T-1]``.

        Raises:
            ValueError: naming the offending value and the valid range.
        """
        out = []
        for t in timesteps:
            if isinstance(t, bool) or int(t) != t:
                raise ValueError(f"timestep {t!r} is not an integer DDPM index; expected an int in "
                                 f"[0, {self.num_train_timesteps - 1}] (0 = least noise)")
            if not 0 <= int(t) < self.num_train_timesteps:
                raise ValueError(f"timestep {t} is out of range: expected an int in "
                                 f"[0, {self.num_train_timesteps - 1}] (0 = least noise, "
                                 f"{self.num_train_timesteps - 1} = almost pure noise)")
            out.append(int(t))
        return out

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε`` with ``t`` a per-sample integer tensor."""
        a = self.alphas_cumprod.to(x.device)[t.long()]
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (a.sqrt().view(shape) * x.double() + (1 - a).sqrt().view(shape) * noise.double()).to(x.dtype)

    def velocity(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x``."""
        a = self.alphas_cumprod.to(x.device)[t.long()]
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (a.sqrt().view(shape) * noise.double() - (1 - a).sqrt().view(shape) * x.double()).to(x.dtype)


class FlowSchedule(NoiseSchedule):
    """The linear interpolant of SiT / rectified flow / SD3 / Flux, on the same integer index as DDPM models.

    Index ``k ∈ {0, …, T-1}`` means noise level ``σ = shift · s / (1 + (shift - 1) · s)`` with ``s = k / T``
    (diffusers' ``FlowMatchEulerDiscreteScheduler`` time shift; ``shift = 1`` is the plain interpolant of
    SiT) and ``x_t = (1 - σ) x + σ ε``. The network receives ``σ · T`` as its timestep, the range its
    sinusoidal embedding was built for, so a flow model's taps are addressed exactly like a DDPM model's
    (0 = least noise, ``T - 1`` almost pure noise), and a shifted model (SD3: 3.0) is tapped at the noise
    levels its own sampler visits at the same index.

    Args:
        num_train_timesteps: ``T``.
        shift: the time shift (``scheduler_config.json``'s ``shift``).
        dynamic: for a resolution-dependent shift (Flux's ``use_dynamic_shifting``), the scheduler's
            ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift`` and ``max_shift``; the adapter
            resolves it for its token count with :meth:`for_sequence_length`.
    """

    prediction_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 dynamic: dict[str, float] | None = None) -> None:
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.T, self.shift, self.dynamic = num_train_timesteps, float(shift), dynamic

    @property
    def num_train_timesteps(self) -> int:
        """``T``: timesteps are the integers ``0 … T-1``."""
        return self.T

    def for_sequence_length(self, image_seq_len: int) -> FlowSchedule:
        """The schedule at a resolution: the dynamic shift resolved as the Flux pipeline does.

        ``μ`` is linear in the image token count between ``(base_image_seq_len, base_shift)`` and
        ``(max_image_seq_len, max_shift)``, and ``shift = exp(μ)`` (diffusers' exponential time shift with
        exponent 1 is the same map as the fixed shift). A schedule without ``dynamic`` is returned as is.
        """
        if self.dynamic is None:
            return self
        d = self.dynamic
        slope = (d["max_shift"] - d["base_shift"]) / (d["max_image_seq_len"] - d["base_image_seq_len"])
        mu = image_seq_len * slope + d["base_shift"] - slope * d["base_image_seq_len"]
        return FlowSchedule(self.T, shift=math.exp(mu))

    def spec(self) -> dict[str, Any]:
        """What about the schedule changes a feature: its kind, prediction type, ``T`` and shift."""
        return {"kind": "flow", "prediction_type": self.prediction_type, "num_train_timesteps": self.T,
                "shift": self.shift, "dynamic": self.dynamic}

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level ``σ`` (float64) of integer indices ``t``."""
        s = t.double() / self.T
        return self.shift * s / (1 + (self.shift - 1) * s)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """``σ · T``, the timestep the network receives (equal to ``t`` when ``shift = 1``)."""
        if self.shift == 1.0:
            return t
        return (self.sigmas(t) * self.T).float()

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - σ) x + σ ε`` with ``t`` the per-sample integer index."""
        return flow_interpolate(x, noise, self.sigmas(t))

    def velocity(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow target ``v = ε - x`` (independent of ``t``)."""
        return noise - x


def flow_interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolant ``x_t = (1 - t) x + t ε`` with continuous ``t ∈ [0, 1]`` (1 = noise)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    t = t.double().view(shape)
    return ((1 - t) * x.double() + t * noise.double()).to(x.dtype)


def sample_seed(seed: int, index: int, member: int = 0) -> int:
    """A 63-bit generator seed for one (seed, sample index, ensemble member) triple.

    A hash rather than ``seed + index`` so that neighbouring seeds do not share noise streams.
    """
    digest = hashlib.blake2b(f"{seed}:{index}:{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_noise(shape: Sequence[int], indices: Sequence[int], seed: int, member: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of ``(len(indices), *shape)``, one seeded stream per sample.

    The noise is drawn on the CPU (bit-identical across machines and batchings) and then moved.
    """
    gen = torch.Generator()
    rows = []
    for i in indices:
        gen.manual_seed(sample_seed(seed, int(i), member))
        rows.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    return torch.stack(rows).to(device=device, dtype=dtype)


#: the rules that draw seeded random noise, keyed by the sample's dataset index or by a hash of its content
RANDOM_NOISE_RULES = ("index", "content")
#: every rule for where a sample's noised input comes from: seeded random noise, or the deterministic
#: inversion of its clean latent (:func:`ddim_invert`)
NOISE_RULES = (*RANDOM_NOISE_RULES, "ddim_inversion")


def content_keys(images: torch.Tensor) -> list[int]:
    """One 63-bit key per image from its bytes (shape and dtype included), for the ``"content"`` rule."""
    keys = []
    for x in images.detach().cpu().contiguous():
        h = hashlib.blake2b(f"{tuple(x.shape)}:{x.dtype}".encode(), digest_size=8)
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
        keys.append(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
    return keys


#: what a discrete network may predict for :func:`ddim_invert` (diffusers' names); flow models predict a velocity
INVERSION_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def inversion_grid(timesteps: Sequence[int], steps: int) -> list[int]:
    """The integer indices an inversion visits, in increasing order.

    The uniform grid ``round(linspace(0, max(timesteps), steps + 1))`` (``steps`` intervals) with every
    requested timestep inserted, so that each one is a grid point and its latent is taken exactly at its
    own noise level rather than at the nearest grid point. Inserted timesteps add network evaluations
    (at most ``len(timesteps) - 1``); where ``steps`` exceeds ``max(timesteps)`` rounding merges points
    and the grid is every index from 0.

    Args:
        timesteps: the requested integer indices (any order, repeats allowed).
        steps: the intervals of the uniform part of the grid.

    Returns:
        Sorted distinct indices, starting at 0 and ending at ``max(timesteps)``.

    Raises:
        ValueError: ``steps < 1``, no timestep, or a negative one.
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"inversion steps must be an integer >= 1, got {steps!r}")
    ts = sorted({int(t) for t in timesteps})
    if not ts:
        raise ValueError("give at least one timestep to invert to")
    if ts[0] < 0:
        raise ValueError(f"timestep {ts[0]} is negative; inversion runs from index 0 upward")
    uniform = torch.linspace(0, ts[-1], int(steps) + 1, dtype=torch.float64).round().long().tolist()
    return sorted({0, *uniform, *ts})


def _inversion_stepper(schedule: NoiseSchedule, grid: list[int]) -> Callable[[int, torch.Tensor, torch.Tensor],
                                                                               torch.Tensor]:
    """``step(j, prediction, x)``: the scheduler update from grid point ``j - 1`` to grid point ``j``.

    Discrete models: diffusers' ``DDIMInverseScheduler`` built over the grid itself, as
    :func:`difffeat.sample.sampling_scheduler` builds its ``DDIMScheduler`` (DDIM's sub-sequence τ): one
    scheduler index per grid point, ``ᾱ`` set to the backbone's ``ᾱ`` at the grid points (float64, not the
    scheduler's float32 product of betas), ``steps_offset=0`` and ``"leading"`` spacing with as many
    inference steps as indices, so ``step(·, j, ·)`` goes exactly from ``ᾱ`` at point ``j - 1`` to ``ᾱ``
    at point ``j``. ``set_alpha_to_one=False``: the clean latent is the state at index 0 (see
    :func:`ddim_invert`), so no step ever starts from ``ᾱ = 1``, where an x0-predicting network gives no
    ε. ``clip_sample=False``: latents have no range. Flow models: ``FlowMatchEulerDiscreteScheduler`` with
    the schedule's own ``σ`` along the grid (shift 1 in the scheduler, since :meth:`FlowSchedule.sigmas`
    already applies the schedule's shift), stepped from ``σ = 0`` upward: its Euler update
    ``x + (σ_next - σ) v`` does not care which way ``σ`` runs.
    """
    from diffusers import DDIMInverseScheduler, FlowMatchEulerDiscreteScheduler

    index = torch.tensor(grid)
    if isinstance(schedule, FlowSchedule):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=1.0)
        scheduler.set_timesteps(sigmas=schedule.sigmas(index).tolist())
        scheduler.set_begin_index(0)  # step i goes from σ[i] to σ[i + 1]; no timestep lookup

        def flow_step(j: int, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return scheduler.step(prediction, scheduler.timesteps[j - 1], x).prev_sample.to(x.dtype)

        return flow_step
    if schedule.prediction_type not in INVERSION_PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {schedule.prediction_type!r}; DDIM inversion takes "
                         f"{', '.join(map(repr, INVERSION_PREDICTION_TYPES))} (and flow models)")
    a = schedule.alphas_cumprod[index]  # ᾱ along the grid, least noisy first
    betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
    scheduler = DDIMInverseScheduler(num_train_timesteps=len(grid), trained_betas=betas.tolist(), clip_sample=False,
                                     set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading",
                                     prediction_type=schedule.prediction_type)
    scheduler.alphas_cumprod = a
    scheduler.set_timesteps(len(grid))  # step ratio 1: step(·, j, ·) starts at index j - 1

    def ddim_step(j: int, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scheduler.step(prediction, j, x).prev_sample.to(x.dtype)

    return ddim_step


def ddim_invert(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                x0: torch.Tensor, timesteps: Sequence[int], steps: int) -> dict[int, torch.Tensor]:
    """Carries clean latents deterministically up to each requested timestep (the ``"ddim_inversion"`` rule).

    One trajectory per call visits the points of :func:`inversion_grid` in increasing order and keeps the
    latent at every requested timestep on the way, so ``k`` timesteps cost one pass, not ``k``. Each
    step evaluates the network at the state it starts from, at that state's own timestep (explicit
    integration of the probability-flow ODE upward: DDIM, Song, Meng & Ermon 2021, §4.3), and moves
    to the next grid point with the scheduler's deterministic update: for discrete models
    ``x_{t'} = sqrt(ᾱ_{t'}) x̂0 + sqrt(1 - ᾱ_{t'}) ε̂`` (``DDIMInverseScheduler.step``), for flow models
    ``x_{σ'} = x_σ + (σ' - σ) v̂`` (``FlowMatchEulerDiscreteScheduler.step``). The latent returned for ``t``
    therefore lies at exactly ``ᾱ_t`` (or ``σ_t``), not at a neighbouring grid point.

    Convention at the clean end: the clean latent is taken as the state at index 0 (``ᾱ_0 ≈ 0.9999``,
    "visually clean", for DDPM schedules; ``σ = 0``, exactly data, for flow ones), as diffusers'
    ``DDIMInverseScheduler`` does with Stable Diffusion's scheduler config (``set_alpha_to_one=False``:
    the first step starts from ``ᾱ_0``), and ``timesteps`` containing 0 gives the clean latent back.
    Starting at ``ᾱ = 1`` instead would show the network an ``ᾱ = 1`` state labelled ``t = 0`` and leave
    ε undefined for x0-predicting models. diffusers' inversion pipelines evaluate the network at the
    *target* timestep of each step, on a state that is not at that noise level; here every network call
    sees a state at exactly the noise level of the timestep it is given, which makes the inversion the
    exact reverse of a DDIM / Euler sampler on the same grid for a perfect denoiser (the tests check it).

    Args:
        denoise: ``denoise(x, model_t) -> prediction``: the network's output for the batch ``x`` at the
            per-row timesteps ``model_t`` (already in the network's convention,
            :meth:`NoiseSchedule.model_timesteps`). Extra output channels beyond the latent's (a DiT's
            learned variance) are dropped, as the samplers do.
        schedule: the backbone's schedule; its ``prediction_type`` says what ``denoise`` returns (``"flow"``:
            the velocity ``ε - x0``).
        x0: clean latents ``(B, C, ...)``.
        timesteps: requested integer indices in ``[0, T-1]``.
        steps: intervals of the uniform part of the grid (:func:`inversion_grid`).

    Returns:
        ``{t: x_t}`` for each requested ``t`` (ascending), in ``x0``'s dtype; the trajectory runs in
        float32 (float64 for float64 input).

    Raises:
        ValueError: a timestep outside ``[0, T-1]``, ``steps < 1``, or an unknown prediction type.
    """
    ts = sorted(set(schedule.validate(timesteps)))
    grid = inversion_grid(ts, steps)
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    step = _inversion_stepper(schedule, grid) if len(grid) > 1 else None
    wanted, channels, b = set(ts), x0.shape[1], x0.shape[0]
    x = x0.to(work)
    out = {0: x0.clone()} if 0 in wanted else {}
    for j in range(1, len(grid)):
        t = torch.full((b,), grid[j - 1], dtype=torch.long, device=x0.device)
        prediction = denoise(x.to(x0.dtype), schedule.model_timesteps(t))[:, :channels]
        x = step(j, prediction.to(work), x)
        if grid[j] in wanted:
            out[grid[j]] = x.to(x0.dtype)
    return {t: out[t] for t in ts}
