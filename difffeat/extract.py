"""``FeatureExtractor``: layers × timesteps × noise-ensemble features from one call.

For a batch of clean images the extractor

1. encodes them to the denoiser's input space (identity for pixel models, VAE mean for latent ones);
2. for each ensemble member draws noise seeded per sample (by dataset index, or by content: see
   :mod:`difffeat.noise`), and noises every (image, timestep) pair: these pairs are the forward *rows*;
   under the ``"ddim_inversion"`` rule it instead inverts each clean latent once, up through every
   requested timestep (:func:`difffeat.noise.ddim_invert`), and row (image, t) gets the inverted ``x_t``;
3. runs the rows through the denoiser in chunks of at most ``batch_size`` rows, with forward hooks on the
   requested layers, stopping right after the deepest one, and applies the readout to each chunk;
4. averages the read-out features over the ensemble.

Rows are independent, so the features do not depend on ``batch_size`` as long as every kernel gives a
row the same bits in any batch. On the CPU that is not so: oneDNN picks algorithms and output memory
formats by batch size, both for small batches (measured: below 8 rows with 2 threads, below 32 with 1)
and for large ones (measured: a 64-row forward of a U-Net gives a channels-last tensor where a 32-row
one does not, and the next convolution rounds differently). So on the CPU every forward has exactly
:data:`CPU_ROWS` rows, whatever ``batch_size`` says: a short last chunk is padded by repeating its last
row, and taps are made contiguous. A CPU gains nothing from larger batches (``experiments/bench_extract.py``
measures time per image flat in the batch size), so this costs no speed. On a GPU ``batch_size`` rows
run per forward, without padding: features for different ``batch_size`` agree to float rounding, and
are bit-identical for a fixed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from difffeat.backbones.base import Backbone, check_images, to_model_range
from difffeat.noise import NOISE_RULES, content_keys, ddim_invert, seeded_noise
from difffeat.readout import GlobalAvg, Readout

__all__ = ["CPU_ROWS", "DEFAULT_BATCH_SIZE", "FeatureExtractor", "FeatureKey", "feature_name", "parse_feature_name"]

FeatureKey = tuple[str, int]


def feature_name(key: FeatureKey) -> str:
    """The string form of a tap key, ``"up_blocks.1@t10"``, used in stores and reports."""
    return f"{key[0]}@t{key[1]}"


def parse_feature_name(name: str) -> FeatureKey:
    """Inverse of :func:`feature_name`."""
    layer, _, t = name.rpartition("@t")
    if not layer or not t.isdigit():
        raise ValueError(f"{name!r} is not a feature name of the form 'layer@t<int>'")
    return layer, int(t)


#: the rows of every forward on the CPU, whatever ``batch_size`` says (see the module docstring)
CPU_ROWS = 32


def _fixed_rows(device: torch.device) -> int | None:
    """The rows every forward must have on ``device`` (``None``: any number up to ``batch_size``)."""
    return CPU_ROWS if device.type == "cpu" else None

#: default rows (image × timestep pairs) per forward: about what a 24 GB GPU holds for SD-2.1 at 768 px
#: in float16 with early exit
DEFAULT_BATCH_SIZE = 8


def _condition_rows(cond: Any, rows: torch.Tensor, batch: int) -> Any:
    """The condition of forward ``rows``: per-image tensors (batch ``batch``) are indexed, shared ones kept."""
    if isinstance(cond, torch.Tensor):
        return cond[rows.to(cond.device)] if cond.ndim > 0 and cond.shape[0] == batch else cond
    if isinstance(cond, dict):
        return {k: _condition_rows(v, rows, batch) for k, v in cond.items()}
    return cond


class FeatureExtractor(nn.Module):
    """Taps a frozen diffusion backbone at several layers and timesteps in one call.

    Args:
        backbone: a :class:`~difffeat.backbones.Backbone`.
        layers: tap names from ``backbone.feature_info``; an unknown name raises a ``KeyError`` that
            lists the valid ones.
        timesteps: DDPM indices in ``[0, T-1]`` (0 = least noise; see :mod:`difffeat.noise`).
        ensemble: noise draws averaged per feature (the same draw is shared by all timesteps of a sample);
            must be 1 under ``"ddim_inversion"``, which draws no noise.
        seed: base seed; noise for sample key ``i``, member ``e`` comes from ``sample_seed(seed, i, e)``.
        readout: how a tap becomes a feature (default :class:`~difffeat.readout.GlobalAvg`).
        dtype: compute dtype of the backbone (e.g. ``torch.bfloat16`` on a GPU); features are returned
            as float32.
        early_exit: stop the forward after the deepest tap (``False`` runs the whole network; the
            features are identical, only slower).
        batch_size: (image, timestep) rows per forward on an accelerator; the features do not depend on
            it. On the CPU every forward has :data:`CPU_ROWS` rows (see the module docstring).
        noise: where the noised input comes from (see :mod:`difffeat.noise`): seeded random noise keyed
            by ``"index"`` (the sample's dataset index) or ``"content"`` (a hash of the image), or
            ``"ddim_inversion"``: the clean latent carried up to each timestep by the backbone's own
            deterministic ODE (DDIM inversion for ε / v / x0 prediction, Euler from ``σ = 0`` for flow
            models), one trajectory per image per call through all requested timesteps. Its network
            calls go through the backbone (plug-ins included) with the same per-image conditions and the
            same rows per forward as the tapped ones (so features do not depend on ``batch_size`` either);
            the inversion itself runs without gradients, like drawn noise.
        inversion_steps: under ``"ddim_inversion"``, the intervals of the uniform grid from 0 to the
            largest requested timestep; each requested timestep is inserted into the grid so its latent
            lies at exactly its own noise level (:func:`difffeat.noise.inversion_grid`). Part of
            :meth:`spec` only under that rule.
        input_range: the value range of the images given (``(0, 1)``, ``(0, 255)``); they are mapped
            linearly onto the ``[-1, 1]`` the backbone expects. ``None`` (default): already in ``[-1, 1]``
            (anything else is refused).
        pad_rows: on the CPU, pad every forward to :data:`CPU_ROWS` rows so features do not depend on the
            batch (default). ``False``: up to ``batch_size`` rows per forward, unpadded, as on a GPU;
            features then agree across batch sizes to float rounding only. Not part of :meth:`spec`.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str], timesteps: Sequence[int], ensemble: int = 1,
                 seed: int = 0, readout: Readout | None = None, dtype: torch.dtype | None = None,
                 early_exit: bool = True, batch_size: int = DEFAULT_BATCH_SIZE, noise: str = "index",
                 input_range: tuple[float, float] | None = None, inversion_steps: int = 50,
                 pad_rows: bool = True) -> None:
        super().__init__()
        if not layers:
            raise ValueError(f"give at least one layer; valid layers: {list(backbone.feature_info)}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if noise not in NOISE_RULES:
            raise ValueError(f"noise must be one of {NOISE_RULES}, got {noise!r}")
        if noise == "ddim_inversion" and ensemble != 1:
            raise ValueError(f"ensemble={ensemble} with noise='ddim_inversion': the inversion is deterministic, "
                             f"every member would get the same latent; use ensemble=1, or a random rule "
                             f"('index', 'content') to average noise draws")
        if isinstance(inversion_steps, bool) or int(inversion_steps) != inversion_steps or inversion_steps < 1:
            raise ValueError(f"inversion_steps must be an integer >= 1, got {inversion_steps!r}")
        if input_range is not None:
            to_model_range(torch.zeros(1), input_range)  # validates the pair
        backbone.modules_by_name(layers)  # fails early on unknown names, listing valid ones
        self.backbone = backbone.requires_grad_(False).eval()
        if dtype is not None:
            self.backbone.to(dtype)
        self.layers = list(dict.fromkeys(layers))
        self.timesteps = backbone.schedule.validate(timesteps)
        if not self.timesteps:
            raise ValueError("give at least one timestep")
        self.ensemble, self.seed, self.early_exit = ensemble, seed, early_exit
        self.batch_size, self.noise, self.inversion_steps = batch_size, noise, int(inversion_steps)
        self.pad_rows = bool(pad_rows)
        self.input_range = tuple(float(v) for v in input_range) if input_range is not None else None
        self.readout = readout if readout is not None else GlobalAvg()

    @classmethod
    def from_name(cls, backbone: str, layers: Sequence[str], timesteps: Sequence[int],
                  backbone_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> FeatureExtractor:
        """Builds the backbone with ``create_backbone(backbone, **backbone_kwargs)`` and taps it."""
        from difffeat.backbones import create_backbone

        return cls(create_backbone(backbone, **(backbone_kwargs or {})), layers, timesteps, **kwargs)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The readout follows ``mode``; the backbone stays in eval mode (frozen means frozen)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def keys(self) -> list[FeatureKey]:
        """The ``(layer, t)`` keys of the returned dict, layer-major."""
        return [(layer, t) for layer in self.layers for t in self.timesteps]

    def spec(self) -> dict[str, Any]:
        """Everything that determines the features but the data.

        The backbone's :meth:`Backbone.spec` and the extractor's own settings (``batch_size`` is not
        among them: it does not change a feature; ``inversion_steps`` is, under ``"ddim_inversion"`` only,
        so keys of the random rules are unchanged).
        """
        readout = {k: v for k, v in vars(self.readout).items() if not k.startswith("_") and k != "training"}
        spec = {"backbone": self.backbone.spec(), "name": self.backbone.name, "layers": self.layers,
                "timesteps": self.timesteps, "ensemble": self.ensemble, "seed": self.seed, "noise": self.noise,
                "input_range": self.input_range, "readout": type(self.readout).__name__, "readout_args": readout}
        if self.noise == "ddim_inversion":
            spec["inversion_steps"] = self.inversion_steps
        return spec

    def _encode(self, images: Any) -> torch.Tensor:
        """Images to the denoiser's input space, the VAE run so an image's latent does not depend on its batch.

        On the CPU the VAE encodes one image per call (its kernels, like the denoiser's, round differently at
        other batch sizes; one image at a time keeps memory at one image's activations), elsewhere
        ``batch_size`` images per call.
        """
        if self.backbone.vae is None or not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) < 2:
            return self.backbone.encode(images)
        check_images(images, self.backbone.image_channels)  # the whole batch, before any work
        chunk = 1 if self.pad_rows and _fixed_rows(images.device) else self.batch_size
        return torch.cat([self.backbone.encode(images[s:s + chunk]) for s in range(0, len(images), chunk)])

    def noise_keys(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int] | None) -> list[int]:
        """The per-sample keys that seed the noise under this extractor's rule (unused by ``"ddim_inversion"``)."""
        if self.noise == "content":
            return content_keys(images)
        b = images.shape[0]
        keys = list(range(b)) if indices is None else [int(i) for i in indices]
        if len(keys) != b:
            raise ValueError(f"got {len(keys)} indices for a batch of {b} images")
        return keys

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int] | None = None,
                cond: Any = None, prompts: Sequence[str] | None = None) -> dict[FeatureKey, torch.Tensor]:
        """Features of ``images`` (``(B, C, H, W)`` in ``[-1, 1]``, or in ``input_range``).

        Args:
            images: clean images (or latents for a latent backbone without a VAE).
            indices: the samples' dataset indices, which seed their noise under the ``"index"`` rule.
                Pass them whenever features must not depend on batching; the default ``0 … B-1`` ties
                noise to batch position.
            cond: per-sample condition: class labels, ``(B, L, D)`` text embeddings, or a dict of the
                denoiser's condition tensors (what :meth:`Backbone.encode_prompts` returns); batch 1 is
                shared by all images. Default: the backbone's unconditional one (the empty prompt).
            prompts: one text prompt per image (``"a photo of a dog"``), encoded by the pipeline's own
                text encoders (:meth:`Backbone.encode_prompts`); not together with ``cond``.

        Raises:
            ValueError: ``prompts`` and ``cond`` both given, or a prompt list whose length is not the batch's.

        Returns:
            ``{(layer, t): feature}`` with float32 features in the readout's layout.
        """
        return self.features(images, indices, cond, prompts)

    def features(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int] | None = None,
                 cond: Any = None, prompts: Sequence[str] | None = None) -> dict[FeatureKey, torch.Tensor]:
        """:meth:`forward` without ``inference_mode``.

        Gradients flow where the backbone has them (a fine-tuned :class:`~difffeat.encoder.DiffusionEncoder`).
        """
        param = next(self.backbone.parameters())
        device, dtype = param.device, param.dtype
        if self.input_range is not None and isinstance(images, torch.Tensor):
            images = to_model_range(images, self.input_range)  # uint8 included
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            images = images.to(device=device, dtype=dtype)
        x0 = self._encode(images)  # checks type, shape and range first
        b = x0.shape[0]
        if prompts is not None:
            if cond is not None:
                raise ValueError("give either prompts or cond, not both")
            if isinstance(prompts, str) or len(prompts) != b:
                got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
                raise ValueError(f"got {got} for a batch of {b} images; give one prompt per image")
            cond = self.backbone.encode_prompts(list(prompts))
        keys = self.noise_keys(images, indices)
        # rows are (timestep, image) pairs, t-major: chunk r covers rows [r·bs, (r+1)·bs)
        steps = torch.tensor(self.timesteps, device=device)
        rows_k = torch.arange(len(self.timesteps), device=device).repeat_interleave(b)  # position in timesteps
        rows_i = torch.arange(b, device=device).repeat(len(self.timesteps))
        infos = self.backbone.feature_info
        sums: dict[FeatureKey, torch.Tensor] = {}
        fixed = _fixed_rows(device) if self.pad_rows else None
        chunk = fixed or self.batch_size
        inverted = self._inverted(x0, cond, chunk, fixed) if self.noise == "ddim_inversion" else None
        for member in range(self.ensemble):
            if inverted is None:
                noise = seeded_noise(x0.shape[1:], keys, self.seed, member, dtype=dtype, device=device)
            parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
            for start in range(0, len(rows_k), chunk):
                k, i = rows_k[start:start + chunk], rows_i[start:start + chunk]
                n = len(k)
                if fixed and n < chunk:  # pad by repeating the last row (see the module docstring)
                    k, i = torch.cat([k, k[-1:].expand(chunk - n)]), torch.cat([i, i[-1:].expand(chunk - n)])
                t = steps[k]
                # where the noise comes from: a seeded draw, or the inverted latent at row (image, t)
                x_t = self.backbone.schedule.add_noise(x0[i], noise[i], t) if inverted is None else inverted[k, i]
                c = _condition_rows(cond, i, b)
                with self.backbone.tap(self.layers, stop_early=self.early_exit) as found:
                    self.backbone.run(x_t, self.backbone.schedule.model_timesteps(t), c)
                for layer in self.layers:
                    tap = found[layer][:n].float().contiguous()
                    parts[layer].append(self.readout(tap, infos[layer]).contiguous())
            for layer in self.layers:
                per_t = torch.cat(parts[layer]).split(b)
                for ti, step in enumerate(self.timesteps):
                    key = (layer, step)
                    sums[key] = per_t[ti] if key not in sums else sums[key] + per_t[ti]
        return {key: (v / self.ensemble if self.ensemble > 1 else v).contiguous() for key, v in
                ((k, sums[k]) for k in self.keys)}

    def _inverted(self, x0: torch.Tensor, cond: Any, chunk: int, fixed: int | None) -> torch.Tensor:
        """The ``"ddim_inversion"`` latents, ``(len(timesteps), B, ...)`` in the order of ``self.timesteps``.

        One :func:`~difffeat.noise.ddim_invert` trajectory for the whole batch; each of its network calls
        runs the batch through the backbone module (so self-conditioning and other plug-ins apply) in
        chunks of ``chunk`` images, with each image's own condition, padded to ``fixed`` rows on the CPU
        exactly like the tapped forwards, so an image's latents do not depend on the batch it is in.
        """
        b = x0.shape[0]

        def denoise(x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
            outs = []
            for start in range(0, b, chunk):
                i = torch.arange(start, min(start + chunk, b), device=x.device)
                n = len(i)
                if fixed and n < chunk:  # pad by repeating the last row (see the module docstring)
                    i = torch.cat([i, i[-1:].expand(chunk - n)])
                outs.append(self.backbone(x[i], model_t[i], _condition_rows(cond, i, b))[:n])
            return torch.cat(outs)

        with torch.no_grad():  # the inverted latent is where the noise comes from, a constant like drawn noise
            latents = ddim_invert(denoise, self.backbone.schedule, x0, self.timesteps, self.inversion_steps)
        return torch.stack([latents[t] for t in self.timesteps])
