"""``FeatureExtractor``: layers × timesteps × noise-ensemble features from one call.

For a batch of clean images the extractor

1. encodes them to the denoiser's input space (identity for pixel models, VAE mean for latent ones);
2. for each ensemble member draws noise seeded per sample (by dataset index, or by content: see
   :mod:`difffeat.noise`), and noises every (image, timestep) pair: these pairs are the forward *rows*;
3. runs the rows through the denoiser in chunks of at most ``batch_size`` rows, with forward hooks on the
   requested layers, stopping right after the deepest one, and applies the readout to each chunk;
4. averages the read-out features over the ensemble.

Rows are independent, so the features do not depend on ``batch_size`` as long as every kernel gives a
row the same bits in any batch. On the CPU that is not so for small batches: oneDNN switches algorithm
and output memory format for batches below a size that grows as the thread count shrinks (measured: 8
rows suffice with 2 threads, 32 with 1). So on the CPU every forward has at least :data:`CPU_MIN_ROWS`
rows: a smaller ``batch_size`` is raised to it and a short last chunk is padded by repeating its last
row; taps are made contiguous, since their memory format varies with the batch too. On a GPU no
padding is done: features for different ``batch_size`` agree to float rounding, and are bit-identical
for a fixed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from difffeat.backbones.base import Backbone, to_model_range
from difffeat.noise import NOISE_RULES, content_keys, seeded_noise
from difffeat.readout import GlobalAvg, Readout

__all__ = ["CPU_MIN_ROWS", "DEFAULT_BATCH_SIZE", "FeatureExtractor", "FeatureKey", "feature_name", "parse_feature_name"]

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


#: the smallest forward batch on the CPU (see the module docstring)
CPU_MIN_ROWS = 32

#: default rows (image × timestep pairs) per forward: about what a 24 GB GPU holds for SD-2.1 at 768 px
#: in float16 with early exit
DEFAULT_BATCH_SIZE = 8


class FeatureExtractor(nn.Module):
    """Taps a frozen diffusion backbone at several layers and timesteps in one call.

    Args:
        backbone: a :class:`~difffeat.backbones.Backbone`.
        layers: tap names from ``backbone.feature_info``; an unknown name raises a ``KeyError`` that
            lists the valid ones.
        timesteps: DDPM indices in ``[0, T-1]`` (0 = least noise; see :mod:`difffeat.noise`).
        ensemble: noise draws averaged per feature (the same draw is shared by all timesteps of a sample).
        seed: base seed; noise for sample key ``i``, member ``e`` comes from ``sample_seed(seed, i, e)``.
        readout: how a tap becomes a feature (default :class:`~difffeat.readout.GlobalAvg`).
        dtype: compute dtype of the backbone (e.g. ``torch.bfloat16`` on a GPU); features are returned
            as float32.
        early_exit: stop the forward after the deepest tap (``False`` runs the whole network; the
            features are identical, only slower).
        batch_size: (image, timestep) rows per forward; the features do not depend on it.
        noise: the noise key rule, ``"index"`` (the sample's dataset index) or ``"content"`` (a hash of
            the image); see :mod:`difffeat.noise`.
        input_range: the value range of the images given (``(0, 1)``, ``(0, 255)``); they are mapped
            linearly onto the ``[-1, 1]`` the backbone expects. ``None`` (default): already in ``[-1, 1]``
            (anything else is refused).
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str], timesteps: Sequence[int], ensemble: int = 1,
                 seed: int = 0, readout: Readout | None = None, dtype: torch.dtype | None = None,
                 early_exit: bool = True, batch_size: int = DEFAULT_BATCH_SIZE, noise: str = "index",
                 input_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        if not layers:
            raise ValueError(f"give at least one layer; valid layers: {list(backbone.feature_info)}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if noise not in NOISE_RULES:
            raise ValueError(f"noise must be one of {NOISE_RULES}, got {noise!r}")
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
        self.batch_size, self.noise = batch_size, noise
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
        among them: it does not change a feature).
        """
        readout = {k: v for k, v in vars(self.readout).items() if not k.startswith("_") and k != "training"}
        return {"backbone": self.backbone.spec(), "name": self.backbone.name, "layers": self.layers,
                "timesteps": self.timesteps, "ensemble": self.ensemble, "seed": self.seed, "noise": self.noise,
                "input_range": self.input_range, "readout": type(self.readout).__name__, "readout_args": readout}

    def noise_keys(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int] | None) -> list[int]:
        """The per-sample keys that seed the noise under this extractor's rule."""
        if self.noise == "content":
            return content_keys(images)
        b = images.shape[0]
        keys = list(range(b)) if indices is None else [int(i) for i in indices]
        if len(keys) != b:
            raise ValueError(f"got {len(keys)} indices for a batch of {b} images")
        return keys

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int] | None = None,
                cond: Any = None) -> dict[FeatureKey, torch.Tensor]:
        """Features of ``images`` (``(B, C, H, W)`` in ``[-1, 1]``, or in ``input_range``).

        Args:
            images: clean images (or latents for a latent backbone without a VAE).
            indices: the samples' dataset indices, which seed their noise under the ``"index"`` rule.
                Pass them whenever features must not depend on batching; the default ``0 … B-1`` ties
                noise to batch position.
            cond: per-sample condition (class labels, or ``(B, L, D)`` text embeddings); default the
                backbone's unconditional one.

        Returns:
            ``{(layer, t): feature}`` with float32 features in the readout's layout.
        """
        return self.features(images, indices, cond)

    def features(self, images: torch.Tensor, indices: torch.Tensor | Sequence[int] | None = None,
                 cond: Any = None) -> dict[FeatureKey, torch.Tensor]:
        """:meth:`forward` without ``inference_mode``.

        Gradients flow where the backbone has them (a fine-tuned :class:`~difffeat.encoder.DiffusionEncoder`).
        """
        param = next(self.backbone.parameters())
        device, dtype = param.device, param.dtype
        if self.input_range is not None and isinstance(images, torch.Tensor):
            images = to_model_range(images, self.input_range)  # uint8 included
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            images = images.to(device=device, dtype=dtype)
        x0 = self.backbone.encode(images)  # checks type, shape and range first
        b = x0.shape[0]
        keys = self.noise_keys(images, indices)
        # rows are (timestep, image) pairs, t-major: chunk r covers rows [r·bs, (r+1)·bs)
        rows_t = torch.tensor(self.timesteps, device=device).repeat_interleave(b)
        rows_i = torch.arange(b, device=device).repeat(len(self.timesteps))
        infos = self.backbone.feature_info
        sums: dict[FeatureKey, torch.Tensor] = {}
        min_rows = CPU_MIN_ROWS if device.type == "cpu" else 1
        chunk = max(self.batch_size, min_rows)
        for member in range(self.ensemble):
            noise = seeded_noise(x0.shape[1:], keys, self.seed, member, dtype=dtype, device=device)
            parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
            for start in range(0, len(rows_t), chunk):
                t, i = rows_t[start:start + chunk], rows_i[start:start + chunk]
                n = len(t)
                if n < min_rows:  # pad by repeating the last row (see the module docstring)
                    t, i = torch.cat([t, t[-1:].expand(min_rows - n)]), torch.cat([i, i[-1:].expand(min_rows - n)])
                x_t = self.backbone.schedule.add_noise(x0[i], noise[i], t)
                c = cond[i] if isinstance(cond, torch.Tensor) and cond.shape[0] == b else cond
                with self.backbone.tap(self.layers, stop_early=self.early_exit) as found:
                    self.backbone.run(x_t, t, c)
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
