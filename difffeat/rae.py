"""Representation autoencoders (RAE) on diffusers' own ``AutoencoderRAE``, and their diffusion-side pieces.

A frozen representation encoder, a trained pixel decoder, latent statistics, the schedule shift.

Following *Diffusion Transformers with Representation Autoencoders* (Zheng et al., 2025):

* **Encoder.** A frozen representation encoder's patch tokens (CLS and register tokens dropped) after its
  final LayerNorm *without* affine parameters, reshaped to a ``[C, h, w]`` latent. Two sources:

  - diffusers' ``AutoencoderRAE`` (DINOv2-with-registers, SigLIP2 or MAE encoders from transformers), so
    published RAE checkpoints in diffusers format load with :meth:`RAE.from_pretrained` unchanged;
  - any timm ViT through :class:`TimmAutoencoderRAE` (for instance the digits teacher of the alignment
    plug-in), which also allows non-square patch grids; its decoder is diffusers' ``RAEDecoder`` with a
    rectangular position table.

  The digits default (:func:`digits_autoencoder`, :func:`pretrain_mae_encoder`) is an MAE-config encoder
  trained here with the MAE objective (masked-patch pixel reconstruction, mask ratio 0.75) on the digits
  training split, without labels: self-supervised, as the paper's MAE encoder is.
* **Decoder.** Trained with an L1 reconstruction loss (:class:`ReconstructionLoss`). The paper adds LPIPS
  and a DINO-discriminator adversarial term; both need pretrained weights that cannot be had offline, so
  they are optional parts (``perceptual`` and ``discriminator``) that are off by default.
* **Noise-augmented decoding.** While the decoder trains, the encoder's tokens get ``σ·ε`` with
  ``σ = τ·U(0, 1)`` per sample (``τ = 0.8`` by default), before latent normalisation, as diffusers'
  ``AutoencoderRAE`` does in training mode; at inference (eval mode) no noise.
* **Latent normalisation.** Mean and standard deviation over the training set, per element (``[C, h, w]``,
  the paper's choice, the default) or per channel (``[C, 1, 1]``), stored in the autoencoder's own
  ``latents_mean`` / ``latents_std`` (config and buffers: a saved folder normalises by itself in diffusers)
  and exportable as a file that records the encoder it belongs to (:class:`LatentStats`).
* **Dimension-dependent shift.** ``t' = α t / (1 + (α − 1) t)`` with ``α = √(m / n)``, ``m = C·h·w`` and a
  base dimension ``n`` (4096 by default). It is exactly diffusers' ``FlowMatchEulerDiscreteScheduler`` time
  shift, so a flow model trained on RAE latents gets it by its scheduler config
  (:func:`shifted_scheduler_config`): :class:`~difffeat.noise.FlowSchedule` applies it to the training
  ``t`` and the sampler (:func:`sample_latents`) to its grid.
* **DiT with a wide DDT head** (``DiTDHTransformer2DModel`` in :mod:`difffeat.backbones.rae`), trained
  with :class:`~difffeat.train.DiffusionModule` on latents served by :class:`RAELatentDataModule`, saved
  with its RAE as one folder by :func:`save_rae_pipeline`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_rae import AutoencoderRAE, RAEDecoder
from diffusers.models.autoencoders.vae import DecoderOutput, EncoderOutput
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from difffeat.digest import tensor_digest
from difffeat.store import atomic_write
from difffeat.train import DiffusionModule, _swap_in, save_pipeline

__all__ = [
    "BASE_DIM",
    "NORM_MODES",
    "RAE",
    "LatentStats",
    "RAEDecoderModule",
    "RAEDiffusionModule",
    "RAELatentDataModule",
    "ReconstructionLoss",
    "TimmAutoencoderRAE",
    "build_digits_rae",
    "digits_autoencoder",
    "load_autoencoder",
    "load_rae",
    "noisy_latents",
    "pretrain_mae_encoder",
    "sample_latents",
    "save_rae_pipeline",
    "shift_alpha",
    "shift_time",
    "shifted_scheduler_config",
    "tokens_to_grid",
    "train_decoder",
]

#: the paper's base dimension ``n`` of the shift ``α = √(m / n)``
BASE_DIM = 4096
#: latent normalisation modes: one mean / std per latent element ``[C, h, w]`` or per channel ``[C, 1, 1]``
NORM_MODES = ("element", "channel")
#: the epsilon diffusers' ``AutoencoderRAE`` adds to the latent std (kept, so saved folders agree with it)
_STD_EPS = 1e-5
#: autoencoder classes a folder may name in ``config.json``
_AUTOENCODERS: dict[str, type[ModelMixin]] = {}


# ----------------------------------------------------------------------------- dimension-dependent shift
def shift_alpha(latent_shape: Sequence[int], base_dim: int = BASE_DIM) -> float:
    """The shift ``α = √(m / n)`` for a latent of ``m = prod(latent_shape)`` elements.

    Args:
        latent_shape: ``(C, h, w)`` (any shape; its element count is ``m``).
        base_dim: ``n``, the dimension at which the schedule is left unshifted.

    Raises:
        ValueError: an empty shape or a non-positive dimension.
    """
    m = math.prod(int(s) for s in latent_shape)
    if not latent_shape or m <= 0 or base_dim <= 0:
        raise ValueError(f"latent_shape {tuple(latent_shape)} and base_dim {base_dim} must be positive")
    return math.sqrt(m / base_dim)


def shift_time(t: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """``t' = α t / (1 + (α − 1) t)`` for ``t ∈ [0, 1]`` (1 = noise): more noise for ``α > 1``.

    Raises:
        ValueError: ``α ≤ 0``.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    t = torch.as_tensor(t, dtype=torch.float64)
    return alpha * t / (1 + (alpha - 1) * t)


def shifted_scheduler_config(latent_shape: Sequence[int], base_dim: int = BASE_DIM) -> dict[str, Any]:
    """The flow scheduler config whose time shift is the dimension-dependent ``α`` of ``latent_shape``.

    diffusers' ``FlowMatchEulerDiscreteScheduler`` maps ``σ ↦ shift·σ / (1 + (shift − 1)·σ)``: the RAE
    shift with ``shift = α``. :class:`~difffeat.noise.FlowSchedule` reads it from this config for training
    and :func:`~difffeat.sample.sampling_scheduler` for sampling.
    """
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift_alpha(latent_shape, base_dim)}


# ----------------------------------------------------------------------------- tokens and grids
def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Patch tokens ``(B, N, C)`` as a latent ``(B, C, h, w)``, row-major as ViTs order patches.

    Args:
        tokens: patch tokens, prefix tokens already removed.
        grid: the encoder's patch grid; ``None`` requires a square one.

    Raises:
        ValueError: ``N`` does not fill ``grid`` (or, without one, is not a square number).
    """
    b, n, c = tokens.shape
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the encoder gives {n} patch tokens, which do not form a square grid; "
                             f"give its (h, w) patch grid, or check how many prefix tokens it has")
        grid = (side, side)
    h, w = grid
    if h * w != n:
        raise ValueError(f"the encoder gives {n} patch tokens, but its patch grid is {h}x{w} = {h * w}: "
                         f"prefix (CLS / register) tokens are miscounted or the input size is wrong")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


# ----------------------------------------------------------------------------- timm encoders
class TimmAutoencoderRAE(ModelMixin, ConfigMixin):
    """A representation autoencoder on a frozen timm ViT, with the conventions of diffusers' ``AutoencoderRAE``.

    ``encode`` takes images in ``[0, 1]`` of exactly ``img_size``, normalises them with
    ``encoder_norm_mean`` / ``encoder_norm_std``, keeps the ViT's patch tokens after its final LayerNorm
    (replaced by one without affine parameters, as the paper does), adds the training noise in training
    mode, reshapes to ``(B, C, h, w)`` and normalises with ``latents_mean`` / ``latents_std``; ``decode``
    inverts it through diffusers' ``RAEDecoder``. Non-square grids (``img_size = (16, 24)``) work: the
    decoder gets a rectangular 2-D sin-cos position table.

    Args:
        model_name: a timm ViT architecture (``vit_tiny_patch16_224``, …), built without pretrained
            weights; load them with :meth:`load_encoder_state_dict` (weights then travel in this folder).
        model_kwargs: timm arguments (``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``depth``,
            ``num_heads``, …).
        decoder_hidden_size: decoder width.
        decoder_num_hidden_layers: decoder depth.
        decoder_num_attention_heads: decoder heads.
        decoder_intermediate_size: decoder MLP width.
        patch_size: decoder patch size (output pixels per token side).
        encoder_norm_mean: per-channel input mean (of images in ``[0, 1]``).
        encoder_norm_std: per-channel input std.
        latents_mean: latent mean (broadcast against ``(C, h, w)``); ``None`` for 0.
        latents_std: latent std; ``None`` for 1.
        noise_tau: ``τ`` of the training noise ``σ = τ·U(0, 1)``.
        scaling_factor: multiplies normalised latents (1 in the paper).
    """

    @register_to_config
    def __init__(self, model_name: str = "vit_tiny_patch16_224", model_kwargs: dict[str, Any] | None = None,
                 decoder_hidden_size: int = 128, decoder_num_hidden_layers: int = 2,
                 decoder_num_attention_heads: int = 4, decoder_intermediate_size: int = 512, patch_size: int = 2,
                 encoder_norm_mean: list[float] | None = None, encoder_norm_std: list[float] | None = None,
                 latents_mean: list | None = None, latents_std: list | None = None, noise_tau: float = 0.0,
                 scaling_factor: float = 1.0) -> None:
        import timm

        super().__init__()
        kwargs = dict(model_kwargs or {})
        encoder = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "norm"):
            raise ValueError(f"timm model {model_name!r} is not a ViT with patch_embed and a final norm")
        dim = int(encoder.num_features)
        # the paper's final LayerNorm without affine parameters (model surgery, not a copied forward)
        encoder.norm = nn.LayerNorm(dim, eps=getattr(encoder.norm, "eps", 1e-6), elementwise_affine=False)
        self.encoder = encoder.requires_grad_(False).eval()
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.num_prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 1))
        channels = int(kwargs.get("in_chans", 3))
        h, w = self.grid
        self.image_size = (h * patch_size, w * patch_size)
        self.decoder = RAEDecoder(hidden_size=dim, decoder_hidden_size=decoder_hidden_size,
                                  decoder_num_hidden_layers=decoder_num_hidden_layers,
                                  decoder_num_attention_heads=decoder_num_attention_heads,
                                  decoder_intermediate_size=decoder_intermediate_size, num_patches=h * w,
                                  patch_size=patch_size, num_channels=channels, image_size=max(self.image_size))
        pos = get_2d_sincos_pos_embed(decoder_hidden_size, (h, w), cls_token=True, extra_tokens=1, output_type="pt")
        self.decoder.register_buffer("decoder_pos_embed", pos.unsqueeze(0).float(), persistent=False)
        mean = encoder_norm_mean or [0.5] * channels
        std = encoder_norm_std or [0.5] * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"encoder_norm_mean / encoder_norm_std need {channels} values (in_chans), got "
                             f"{len(mean)} / {len(std)}")
        self.register_buffer("encoder_mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("encoder_std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("_latents_mean", torch.tensor(latents_mean) if latents_mean is not None
                             else torch.zeros(1))
        self.register_buffer("_latents_std", torch.tensor(latents_std) if latents_std is not None else torch.ones(1))
        self.noise_tau = float(noise_tau)

    def load_encoder_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads trained timm weights into the encoder (its final norm's affine and any head are dropped).

        Raises:
            KeyError: a missing encoder weight, or an unexpected one other than ``norm.*`` / ``head.*``.
        """
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm.", "fc_norm."))}
        missing, unexpected = self.encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"timm encoder weights do not fit {self.config.model_name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")

    def encode(self, x: torch.Tensor, return_dict: bool = True,
               generator: torch.Generator | None = None) -> EncoderOutput | tuple[torch.Tensor]:
        """Images in ``[0, 1]`` ``(B, in_chans, *img_size)`` to normalised latents ``(B, C, h, w)``."""
        if tuple(x.shape[-2:]) != tuple(self.image_size):
            raise ValueError(f"images of size {tuple(x.shape[-2:])} given to a timm RAE encoder built for "
                             f"{tuple(self.image_size)} (its img_size)")
        x = (x - self.encoder_mean.to(x)) / self.encoder_std.to(x)
        tokens = self.encoder.forward_features(x)[:, self.num_prefix_tokens:]
        if self.training and self.noise_tau > 0:
            sigma = self.noise_tau * torch.rand((tokens.shape[0], 1, 1), generator=generator, device=x.device,
                                                dtype=x.dtype)
            tokens = tokens + sigma * torch.randn(tokens.shape, generator=generator, device=x.device, dtype=x.dtype)
        z = tokens_to_grid(tokens, self.grid)
        z = (z - self._latents_mean.to(z)) / (self._latents_std.to(z) + _STD_EPS) * self.config.scaling_factor
        return EncoderOutput(latent=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Normalised latents ``(B, C, h, w)`` to images in ``[0, 1]`` (not clamped)."""
        z = z / self.config.scaling_factor * (self._latents_std.to(z) + _STD_EPS) + self._latents_mean.to(z)
        tokens = z.flatten(2).transpose(1, 2)
        x = self.decoder.unpatchify(self.decoder(tokens).logits, self.image_size)
        x = x * self.encoder_std.to(x) + self.encoder_mean.to(x)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode then decode."""
        out = self.decode(self.encode(sample, generator=generator).latent).sample
        return DecoderOutput(sample=out) if return_dict else (out,)


_AUTOENCODERS.update({"AutoencoderRAE": AutoencoderRAE, "TimmAutoencoderRAE": TimmAutoencoderRAE})


def load_autoencoder(folder: str | Path) -> ModelMixin:
    """Loads an ``AutoencoderRAE`` or :class:`TimmAutoencoderRAE` folder (never from the network).

    Raises:
        FileNotFoundError: no ``config.json`` in ``folder``.
        KeyError: a ``_class_name`` that is not a representation autoencoder.
        ValueError: an ``AutoencoderRAE`` whose ``encoder_type`` transformers cannot build here, named
            with the valid types and the file.
    """
    from diffusers.models.autoencoders import autoencoder_rae

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a diffusers autoencoder folder")
    config = json.loads(config_path.read_text())
    name = config.get("_class_name")
    if name not in _AUTOENCODERS:
        raise KeyError(f"{config_path} names class {name!r}; a representation autoencoder is one of "
                       f"{sorted(_AUTOENCODERS)}")
    if name == "AutoencoderRAE":
        valid = sorted(autoencoder_rae._ENCODER_FORWARD_FNS)
        kind = config.get("encoder_type", "dinov2")
        if kind not in valid:
            raise ValueError(f"{config_path}: encoder_type {kind!r} cannot be built by transformers through "
                             f"AutoencoderRAE; valid encoder types: {valid}")
    try:
        return _AUTOENCODERS[name].from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        raise ValueError(f"cannot build the {name} in {folder}: {err}") from err


# ----------------------------------------------------------------------------- latent statistics
@dataclass
class LatentStats:
    """Latent mean and std over a training set, and the encoder they were measured with.

    Attributes:
        mean: ``(C, h, w)`` (``"element"``) or ``(C, 1, 1)`` (``"channel"``).
        std: same shape, population standard deviation.
        mode: ``"element"`` or ``"channel"``.
        encoder: digest of the encoder (:meth:`RAE.encoder_digest`); a file is refused by another encoder.
    """

    mean: torch.Tensor
    std: torch.Tensor
    mode: str
    encoder: str

    @classmethod
    def fit(cls, latents: torch.Tensor, encoder: str, mode: str = "element") -> LatentStats:
        """Statistics of raw (unnormalised) latents ``(N, C, h, w)``.

        Raises:
            ValueError: an unknown mode or fewer than two latents.
        """
        if mode not in NORM_MODES:
            raise ValueError(f"latent normalisation mode must be one of {NORM_MODES}, got {mode!r}")
        if latents.ndim != 4 or len(latents) < 2:
            raise ValueError(f"latent statistics need (N >= 2, C, h, w) latents, got {tuple(latents.shape)}")
        dims = (0,) if mode == "element" else (0, 2, 3)
        x = latents.double()
        mean = x.mean(dims)
        std = x.var(dims, unbiased=False).sqrt()
        if mode == "channel":
            mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        return cls(mean.float(), std.float(), mode, encoder)

    def save(self, path: str | Path) -> None:
        """Writes the statistics as safetensors (metadata: mode and encoder digest), atomically."""
        data = save({"mean": self.mean.contiguous(), "std": self.std.contiguous()},
                    metadata={"mode": self.mode, "encoder": self.encoder, "format": "difffeat-rae-latent-stats"})
        atomic_write(path, data)

    @classmethod
    def load(cls, path: str | Path, encoder: str | None = None) -> LatentStats:
        """Reads a statistics file; with ``encoder``, refuses one measured with another encoder.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a statistics file, or a different encoder (both digests named).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no latent statistics file at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "difffeat-rae-latent-stats" or set(f.keys()) != {"mean", "std"}:
                raise ValueError(f"{path} is not a RAE latent statistics file (keys {sorted(f.keys())})")
            stats = cls(f.get_tensor("mean"), f.get_tensor("std"), meta["mode"], meta["encoder"])
        if encoder is not None and stats.encoder != encoder:
            raise ValueError(f"{path} holds latent statistics of another encoder (digest {stats.encoder[:12]}…), "
                             f"not of this one ({encoder[:12]}…): recompute them with RAE.fit_latent_stats")
        return stats


# ----------------------------------------------------------------------------- the pipeline object
class RAE(nn.Module):
    """A representation autoencoder as difffeat uses it: images in ``[-1, 1]`` ↔ normalised latents.

    Wraps a diffusers ``AutoencoderRAE`` (which takes 3-channel images in ``[0, 1]``) or a
    :class:`TimmAutoencoderRAE`; grey images are repeated to the encoder's channels and decoded
    images averaged back. The encoder is frozen (no gradients, always in eval mode); only the decoder
    trains (:func:`train_decoder`). ``latent`` is an identity module every encoded latent passes
    through, the extractor's tap on the RAE latent itself.

    Args:
        autoencoder: the diffusers-format autoencoder.
        image_channels: channels of the images the user passes (1 for digits).
    """

    def __init__(self, autoencoder: ModelMixin, image_channels: int = 3) -> None:
        super().__init__()
        if type(autoencoder).__name__ not in _AUTOENCODERS:
            raise TypeError(f"RAE wraps one of {sorted(_AUTOENCODERS)}, got {type(autoencoder).__name__}")
        self.autoencoder = autoencoder
        self.image_channels = int(image_channels)
        if self.image_channels not in (1, self.ae_channels):
            raise ValueError(f"image_channels must be 1 or the encoder's {self.ae_channels}, got {image_channels}")
        self.latent = nn.Identity()
        self.autoencoder.encoder.requires_grad_(False)
        self.freeze_encoder()

    def freeze_encoder(self) -> None:
        """Puts the encoder in eval mode (called after every ``train()``: frozen means frozen)."""
        self.autoencoder.encoder.eval()

    def train(self, mode: bool = True) -> RAE:
        """Train mode for the decoder (noise augmentation on); the encoder stays in eval mode."""
        super().train(mode)
        self.freeze_encoder()
        return self

    @property
    def ae_channels(self) -> int:
        """Channels the autoencoder's encoder takes."""
        return int(self.autoencoder.encoder_mean.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        """The latent's patch grid ``(h, w)``."""
        ae = self.autoencoder
        if isinstance(ae, TimmAutoencoderRAE):
            return ae.grid
        side = math.isqrt(ae.num_patches)
        return side, side

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent."""
        ae = self.autoencoder
        c = ae.config.encoder_hidden_size if isinstance(ae, AutoencoderRAE) else ae.encoder.num_features
        return (int(c), *self.grid)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of decoded images."""
        ae = self.autoencoder
        if isinstance(ae, TimmAutoencoderRAE):
            return tuple(ae.image_size)
        return ae.decoder_image_size, ae.decoder_image_size

    @property
    def noise_tau(self) -> float:
        """``τ`` of the noise augmentation applied in training mode."""
        return float(self.autoencoder.noise_tau)

    def set_noise_tau(self, tau: float) -> None:
        """Sets ``τ`` (also in the autoencoder's config, so a saved folder keeps it).

        Raises:
            ValueError: ``τ < 0``.
        """
        if tau < 0:
            raise ValueError(f"noise_tau must be >= 0, got {tau}")
        self.autoencoder.noise_tau = float(tau)
        self.autoencoder.register_to_config(noise_tau=float(tau))

    def encoder_digest(self) -> str:
        """SHA-256 of the encoder: its class, its configuration and every weight."""
        ae = self.autoencoder
        keys = ("encoder_type", "encoder_hidden_size", "encoder_patch_size", "encoder_num_hidden_layers",
                "encoder_input_size", "encoder_norm_mean", "encoder_norm_std", "model_name", "model_kwargs")
        cfg = {k: ae.config.get(k) for k in keys}
        state = {f"encoder.{k}": v for k, v in ae.encoder.state_dict().items()}
        state["_config"] = torch.frombuffer(bytearray(json.dumps([type(ae).__name__, cfg], sort_keys=True,
                                                                 default=str).encode()), dtype=torch.uint8)
        return tensor_digest(state)

    def config(self) -> dict[str, Any]:
        """What about the RAE changes a feature besides its weights (for backbone specs)."""
        return {"autoencoder": type(self.autoencoder).__name__, "image_channels": self.image_channels,
                "latent_shape": list(self.latent_shape), "scaling_factor": self.autoencoder.config.scaling_factor}

    # ------------------------------------------------------------------ encode / decode
    def _to_ae(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"images must be (B, {self.image_channels}, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = (images.float() + 1) / 2
        return x.expand(-1, self.ae_channels, -1, -1) if self.image_channels != self.ae_channels else x

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in ``[-1, 1]`` to normalised latents ``(B, C, h, w)`` (noisy only in training mode)."""
        return self.latent(self.autoencoder.encode(self._to_ae(images), generator=generator).latent)

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raises ``ValueError`` for a latent batch that is not ``(B, C, h, w)`` of this RAE."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents of shape {shape} given to a RAE decoder that takes (B, "
                             f"{', '.join(map(str, self.latent_shape))})")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents to images in ``[-1, 1]`` (not clamped), ``image_channels`` channels."""
        self.check_latents(latents)
        x = self.autoencoder.decode(latents).sample * 2 - 1
        return x.mean(1, keepdim=True) if self.image_channels != x.shape[1] else x

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction of ``images`` (with noise augmentation in training mode)."""
        return self.decode(self.encode(images, generator))

    # ------------------------------------------------------------------ normalisation
    def _stats_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        ae = self.autoencoder
        return ae._latents_mean, ae._latents_std

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents to the normalised ones :meth:`encode` returns (the autoencoder's own formula)."""
        mean, std = self._stats_buffers()
        return (raw - mean.to(raw)) / (std.to(raw) + _STD_EPS) * self.autoencoder.config.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        mean, std = self._stats_buffers()
        return latents / self.autoencoder.config.scaling_factor * (std.to(latents) + _STD_EPS) + mean.to(latents)

    @torch.no_grad()
    def raw_latents(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unnormalised, noise-free latents of ``images`` (eval-mode encoder)."""
        was = self.training
        self.eval()
        try:
            out = [self.denormalize(self.encode(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        finally:
            self.train(was)
        return torch.cat(out)

    def fit_latent_stats(self, images: torch.Tensor, mode: str = "element", batch_size: int = 256) -> LatentStats:
        """Measures latent statistics over ``images`` (the training set) and stores them in the autoencoder."""
        stats = LatentStats.fit(self.raw_latents(images, batch_size), self.encoder_digest(), mode)
        self.set_latent_stats(stats)
        return stats

    def set_latent_stats(self, stats: LatentStats) -> None:
        """Stores ``stats`` in the autoencoder's ``latents_mean`` / ``latents_std`` (buffers and config).

        Raises:
            ValueError: statistics of another encoder, or a shape that does not fit the latent.
        """
        if stats.encoder != self.encoder_digest():
            raise ValueError("these latent statistics were measured with another encoder (digest "
                             f"{stats.encoder[:12]}…, this one {self.encoder_digest()[:12]}…)")
        c, h, w = self.latent_shape
        allowed = {(c, h, w), (c, 1, 1)}
        if tuple(stats.mean.shape) not in allowed or stats.std.shape != stats.mean.shape:
            raise ValueError(f"latent statistics of shape {tuple(stats.mean.shape)} do not fit latents {(c, h, w)}")
        ae = self.autoencoder
        device = ae._latents_mean.device
        ae.register_buffer("_latents_mean", stats.mean.clone().to(device), persistent=True)
        ae.register_buffer("_latents_std", stats.std.clone().to(device), persistent=True)
        ae.register_to_config(latents_mean=stats.mean.tolist(), latents_std=stats.std.tolist())

    def latent_stats(self) -> LatentStats:
        """The statistics stored in the autoencoder (mode ``"channel"`` for a ``(C, 1, 1)`` or scalar one)."""
        mean, std = (t.detach().cpu().clone() for t in self._stats_buffers())
        mode = "element" if mean.ndim == 3 and mean.shape[1:] != (1, 1) else "channel"
        return LatentStats(mean, std, mode, self.encoder_digest())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | Path) -> Path:
        """Writes the RAE to ``folder`` atomically (staged beside it, then renamed in).

        The folder holds the autoencoder (diffusers ``save_pretrained``), ``difffeat_rae.json`` and
        ``latent_stats.safetensors``.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.export-"))
        try:
            tmp = staging / "new"
            self.write(tmp)
            _swap_in(tmp, folder, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def write(self, folder: Path) -> None:
        """Writes the RAE into a new folder (not atomic; :meth:`save_pretrained` stages it)."""
        self.autoencoder.save_pretrained(folder, safe_serialization=True)
        (folder / "difffeat_rae.json").write_text(json.dumps({"image_channels": self.image_channels}, indent=2))
        self.latent_stats().save(folder / "latent_stats.safetensors")

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_channels: int | None = None) -> RAE:
        """Loads a folder written by :meth:`save_pretrained` or any diffusers ``AutoencoderRAE`` folder.

        Args:
            folder: the folder (a published ``AutoencoderRAE`` checkpoint works unchanged).
            image_channels: overrides the channels recorded in ``difffeat_rae.json`` (default there, else 3).
        """
        folder = Path(folder)
        meta_path = folder / "difffeat_rae.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        rae = cls(load_autoencoder(folder), image_channels or meta.get("image_channels", 3))
        return rae.eval()


# ----------------------------------------------------------------------------- the digits default
def digits_autoencoder(hidden_size: int = 128, patch_size: int = 2, num_layers: int = 2, image_size: int = 16,
                       decoder_hidden_size: int = 128, decoder_layers: int = 2, decoder_heads: int = 4,
                       seed: int = 0) -> AutoencoderRAE:
    """A small MAE-config ``AutoencoderRAE`` for 16×16 digits (random encoder; see :func:`pretrain_mae_encoder`).

    Defaults: width 128 (2 heads of 64, ``AutoencoderRAE``'s fixed head size), patch 2, 2 layers, so the
    latent is ``128 × 8 × 8`` (``m = 8192``, shift ``α = √2`` at ``n = 4096``, more noise as in the paper's
    high-dimensional latents; width 64 would give ``m = n`` and no shift). ``AutoencoderRAE`` fixes the
    encoder MLP at transformers' default 3072, which dominates the CPU cost: hence only 2 layers. Inputs
    are normalised with mean = std = 0.5, so the encoder sees the digits in ``[-1, 1]``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderRAE(encoder_type="mae", encoder_hidden_size=hidden_size, encoder_patch_size=patch_size,
                              encoder_num_hidden_layers=num_layers, encoder_input_size=image_size,
                              patch_size=patch_size,
                              decoder_hidden_size=decoder_hidden_size, decoder_num_hidden_layers=decoder_layers,
                              decoder_num_attention_heads=decoder_heads,
                              decoder_intermediate_size=4 * decoder_hidden_size,
                              encoder_norm_mean=[0.5] * 3, encoder_norm_std=[0.5] * 3)


def pretrain_mae_encoder(ae: AutoencoderRAE, images: torch.Tensor, steps: int = 1500, batch_size: int = 64,
                         lr: float = 1.5e-3, mask_ratio: float = 0.75, seed: int = 0,
                         progress: bool = False) -> list[float]:
    """Trains the MAE encoder of ``ae`` with the MAE objective on ``images`` (no labels), in place.

    A transformers ``ViTMAEForPreTraining`` is built with the encoder's exact config (so the weights
    transplant key for key, final LayerNorm without affine included), a 1-layer 64-wide pixel decoder
    (CPU-sized; MAE's is 8 × 512), normalised-pixel targets and ``mask_ratio`` 0.75 as MAE; AdamW with a
    cosine decay. The input goes through the autoencoder's own resizing and normalisation. Afterwards the
    encoder is frozen again.

    Args:
        ae: an ``AutoencoderRAE`` with ``encoder_type="mae"``.
        images: ``(N, 1 or 3, H, W)`` in ``[-1, 1]``.
        steps: optimisation steps.
        batch_size: images per step.
        lr: peak learning rate.
        mask_ratio: fraction of patches hidden from the encoder.
        seed: seeds the init of the MAE decoder, the masks and the batches.
        progress: show a progress bar.

    Returns:
        The loss of every step.

    Raises:
        ValueError: ``ae`` has no MAE encoder.
    """
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    if not isinstance(ae, AutoencoderRAE) or ae.config.encoder_type != "mae":
        raise ValueError("pretrain_mae_encoder trains the encoder of an AutoencoderRAE with encoder_type='mae'")
    cfg = ViTMAEConfig(**{**ae.encoder.config.to_dict(), "mask_ratio": mask_ratio, "norm_pix_loss": True,
                          "decoder_hidden_size": 64, "decoder_num_hidden_layers": 1,
                          "decoder_num_attention_heads": 2, "decoder_intermediate_size": 256})
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mae = ViTMAEForPreTraining(cfg)
        mae.vit.layernorm.weight = None  # the RAE encoder's final LayerNorm has no affine parameters
        mae.vit.layernorm.bias = None
        mae.vit.load_state_dict(ae.encoder.state_dict())
        mae.train()
        opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=lr, weight_decay=0.05,
                                betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        rgb = RAE(ae, image_channels=images.shape[1])
        losses = []
        for _ in tqdm(range(steps), disable=not progress, desc="MAE"):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            x = ae._resize_and_normalize(rgb._to_ae(images[idx]))  # the autoencoder's own input path
            noise = torch.rand(batch_size, ae.num_patches, generator=gen)
            loss = mae(pixel_values=x, noise=noise, interpolate_pos_encoding=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    ae.encoder.load_state_dict(mae.vit.state_dict())
    ae.encoder.requires_grad_(False).eval()
    return losses


# ----------------------------------------------------------------------------- decoder training
class ReconstructionLoss(nn.Module):
    """The decoder's loss: L1, plus optional perceptual and adversarial terms.

    The paper trains with L1 + LPIPS + a DINO-discriminator GAN term. LPIPS and the discriminator need
    pretrained networks that cannot be fetched offline: pass them to switch those terms on.

    Args:
        l1_weight: weight of the L1 term.
        perceptual: ``f(reconstruction, target) -> scalar`` (e.g. torchmetrics' LPIPS with local weights);
            ``None`` (default) leaves the term out.
        perceptual_weight: its weight.
        discriminator: a module scoring images (higher = real); ``None`` (default) leaves the GAN term out.
            Its hinge loss is :meth:`discriminator_loss`, its generator term ``-D(x̂)``.
        adversarial_weight: weight of the generator term.
    """

    def __init__(self, l1_weight: float = 1.0, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 | None = None, perceptual_weight: float = 1.0, discriminator: nn.Module | None = None,
                 adversarial_weight: float = 0.75) -> None:
        super().__init__()
        self.l1_weight, self.perceptual, self.perceptual_weight = l1_weight, perceptual, perceptual_weight
        self.discriminator, self.adversarial_weight = discriminator, adversarial_weight

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named terms and their weighted sum under ``"loss"``."""
        terms = {"l1": self.l1_weight * F.l1_loss(recon, target)}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual_weight * self.perceptual(recon, target)
        if self.discriminator is not None:
            terms["adversarial"] = -self.adversarial_weight * self.discriminator(recon).mean()
        terms["loss"] = sum(terms.values())
        return terms

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the discriminator on real images and (detached) reconstructions."""
        if self.discriminator is None:
            raise ValueError("no discriminator: the adversarial term is off")
        return (F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake.detach())).mean())


def noisy_latents(raw: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``raw + σ·ε`` with ``σ = τ·U(0, 1)`` per sample: the noise ``AutoencoderRAE`` adds in training mode."""
    sigma = tau * torch.rand((raw.shape[0],) + (1,) * (raw.ndim - 1), generator=generator, dtype=raw.dtype)
    return raw + sigma * torch.randn(raw.shape, generator=generator, dtype=raw.dtype)


def train_decoder(rae: RAE, images: torch.Tensor, steps: int = 1000, batch_size: int = 64, lr: float = 1e-3,
                  noise_tau: float = 0.8, seed: int = 0, loss: ReconstructionLoss | None = None,
                  progress: bool = False, raw: torch.Tensor | None = None) -> list[float]:
    """Trains the RAE's decoder (encoder frozen) on noise-augmented latents, in place.

    The frozen encoder is deterministic, so it runs once over ``images`` (eval mode) and each step adds
    the augmentation ``σ·ε``, ``σ = τ·U(0, 1)`` per sample, to the cached raw tokens before normalisation,
    which is what the autoencoder's training mode does at every step (:func:`noisy_latents`), at a fraction
    of the CPU cost. AdamW with a cosine decay to 0; afterwards the RAE is in eval mode.

    Args:
        rae: the RAE (its encoder stays frozen).
        images: ``(N, C, H, W)`` training images in ``[-1, 1]``.
        steps: optimisation steps.
        batch_size: images per step.
        lr: peak learning rate.
        noise_tau: ``τ`` (0 trains without noise augmentation); stored in the autoencoder's config.
        seed: seeds batches and noise.
        loss: the loss (default: L1 only).
        progress: show a progress bar.
        raw: ``rae.raw_latents(images)`` when already computed (the same encoder trains several decoders).

    Returns:
        The loss of every step.

    Raises:
        ValueError: ``raw`` does not match ``images`` and the latent shape.
    """
    loss = loss or ReconstructionLoss()
    rae.set_noise_tau(noise_tau)
    raw = rae.raw_latents(images) if raw is None else raw
    if raw.shape != (len(images), *rae.latent_shape):
        raise ValueError(f"raw latents {tuple(raw.shape)} do not match {len(images)} images of latent "
                         f"{rae.latent_shape}")
    opt = torch.optim.AdamW(rae.autoencoder.decoder.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    d_opt = (torch.optim.AdamW(loss.discriminator.parameters(), lr=lr) if loss.discriminator is not None else None)
    gen = torch.Generator().manual_seed(seed)
    rae.train()
    losses = []
    try:
        for _ in tqdm(range(steps), disable=not progress, desc="decoder"):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            x = images[idx]
            recon = rae.decode(rae.normalize(noisy_latents(raw[idx], noise_tau, gen)))
            terms = loss(recon, x)
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            sched.step()
            if d_opt is not None:
                d_opt.zero_grad()
                loss.discriminator_loss(x, recon).backward()
                d_opt.step()
            losses.append(terms["loss"].item())
    finally:
        rae.eval()
    return losses


class RAEDecoderModule(L.LightningModule):
    """Trains a RAE decoder with Lightning (``difffeat fit``); the same step as :func:`train_decoder`.

    Args:
        checkpoint: a RAE folder to start from (its encoder trained, e.g. by :func:`build_digits_rae`);
            ``None`` is :func:`load_rae`'s random-encoder stand-in of the same shape (for tests).
        noise_tau: ``τ`` of the noise augmentation.
        lr: AdamW learning rate.
        export_dir: where the RAE is saved when training ends.
    """

    def __init__(self, checkpoint: str | None = None, noise_tau: float = 0.8, lr: float = 1e-3,
                 export_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.rae = load_rae(checkpoint)
        self.rae.set_noise_tau(noise_tau)
        self.loss = ReconstructionLoss()
        self.lr, self.export_dir = lr, export_dir

    def on_train_epoch_start(self) -> None:
        """Keeps the encoder in eval mode (Lightning sets train mode on the whole module)."""
        self.rae.freeze_encoder()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """L1 (and optional terms) between a noise-augmented reconstruction and the batch."""
        self.rae.freeze_encoder()
        terms = self.loss(self.rae(batch["image"]), batch["image"])
        self.log("train/loss", terms["loss"], prog_bar=True)
        return terms["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the decoder only."""
        return torch.optim.AdamW(self.rae.autoencoder.decoder.parameters(), lr=self.lr)

    def on_train_end(self) -> None:
        """Saves the RAE to ``export_dir`` (rank 0), if set."""
        if self.export_dir and self.trainer.is_global_zero:
            self.rae.eval().save_pretrained(self.export_dir)


# ----------------------------------------------------------------------------- latent-space diffusion
class RAELatentDataModule(L.LightningDataModule):
    """Digits encoded once by a frozen RAE, served as ``{"image": latent}`` for ``DiffusionModule``.

    The latents are the eval-mode encoder's (no noise augmentation) after the RAE's normalisation.

    Args:
        checkpoint: the RAE folder (``None``: :func:`load_rae`'s stand-in).
        size: digit image size.
        batch_size: latents per batch.
        seed: the digits split seed.
    """

    def __init__(self, checkpoint: str | None = None, size: int = 16, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.rae_dir, self.size, self.batch_size, self.seed = checkpoint, size, batch_size, seed
        self._latents: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Encodes the training split (once)."""
        if self._latents is None:
            from difffeat.data import load_digits_split

            rae = load_rae(self.rae_dir)
            images = load_digits_split("train", self.size, self.seed)[0]
            self._latents = rae.normalize(rae.raw_latents(images))

    def train_dataloader(self) -> DataLoader:
        """Shuffled latent batches."""
        self.setup()

        class _Dict(TensorDataset):
            def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
                return {"image": self.tensors[0][i]}

        return DataLoader(_Dict(self._latents), batch_size=self.batch_size, shuffle=True, drop_last=True)


def save_rae_pipeline(model: nn.Module, scheduler_config: dict[str, Any], rae: RAE | None, folder: str | Path,
                      extra: dict[str, Any] | None = None) -> Path:
    """Saves a latent denoiser, its scheduler and its RAE (``rae/``) as one folder, atomically.

    The denoiser part is :func:`difffeat.train.save_pipeline`'s layout; ``model_index.json`` also names
    the ``rae`` component. ``create_backbone(folder)`` loads the whole pipeline.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.export-"))
    try:
        tmp = save_pipeline(model, scheduler_config, staging / "new", extra=extra)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = [type(model).__module__, type(model).__name__]
        if rae is not None:
            rae.write(tmp / "rae")
            index["rae"] = ["difffeat.rae", "RAE"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        _swap_in(tmp, folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@torch.inference_mode()
def sample_latents(backbone: nn.Module, n: int, steps: int = 25, seed: int = 0, batch_size: int = 256,
                   progress: bool = False) -> torch.Tensor:
    """Euler ODE samples of a flow backbone on its (shifted) grid, unclamped (latents have no range).

    The updates are :func:`difffeat.sample.sampling_scheduler`'s ``FlowMatchEulerDiscreteScheduler``
    steps, whose ``shift`` is the backbone schedule's (``α`` for RAE pipelines): the grid ``σ_i =
    shift(1 − i/steps)``. Noise is drawn on the CPU from ``seed``.

    Returns:
        ``(n, C, h, w)`` float32 latents on the CPU.
    """
    from difffeat.sample import sample

    return sample(backbone, n, steps, seed, batch_size, progress, clamp=False)


class RAEDiffusionModule(DiffusionModule):
    """:class:`~difffeat.train.DiffusionModule` for a denoiser of RAE latents (or of pixels, ``rae=None``).

    Trains on the batches it is given (:class:`RAELatentDataModule` serves RAE latents) with the flow
    objective; the scheduler's shift is the latent's dimension-dependent ``α`` unless ``scheduler``
    overrides it, so training ``t`` and the sampling grid are shifted. The export is one folder with the
    denoiser, its scheduler and the RAE (:func:`save_rae_pipeline`).

    Args:
        checkpoint: the RAE folder whose latents the denoiser models (``None``: :func:`load_rae`'s stand-in).
        pixel_space: train on pixels instead (no RAE, no shift), for comparisons.
        base_dim: ``n`` of the shift.
        backbone: a registered denoiser (``dit-dh-digits``) or a folder.
        scheduler: overrides of the shifted flow scheduler config.
        objective: the training objective (``"flow"``).
        **kwargs: the other :class:`~difffeat.train.DiffusionModule` arguments.
    """

    def __init__(self, checkpoint: str | None = None, pixel_space: bool = False, base_dim: int = BASE_DIM,
                 backbone: str = "dit-dh-digits", scheduler: dict[str, Any] | None = None, objective: str = "flow",
                 **kwargs: Any) -> None:
        rae = None if pixel_space else load_rae(checkpoint)
        if rae is not None:
            scheduler = {**shifted_scheduler_config(rae.latent_shape, base_dim), **(scheduler or {})}
        super().__init__(backbone=backbone, scheduler=scheduler, objective=objective, **kwargs)
        self._rae = [rae]  # kept out of the module tree: not trained, not in checkpoints

    def export(self, folder: str | Path) -> Path:
        """Saves the EMA denoiser, its scheduler and the RAE as one pipeline folder, atomically."""
        rae = self._rae[0]
        return save_rae_pipeline(self.ema.model, self.scheduler_config, rae, folder,
                                 extra={"hparams": dict(self.hparams), "global_step": self.global_step})


def load_rae(checkpoint: str | Path | None = None) -> RAE:
    """A RAE folder, or (``None``) a random-encoder stand-in of the digits default's shape.

    The stand-in is :func:`digits_autoencoder` with seed 0 and latent statistics of the digits training
    split: the same shapes as the trained default, so configs run under ``fast_dev_run`` without it.
    """
    if checkpoint is not None:
        return RAE.from_pretrained(checkpoint)
    return copy.deepcopy(_stand_in())  # a copy: a decoder module trains its own


@functools.cache
def _stand_in() -> RAE:
    """The random-encoder digits RAE, built once per process (its statistics need a pass over the digits)."""
    from difffeat.data import load_digits_split

    rae = RAE(digits_autoencoder(seed=0), image_channels=1)
    rae.fit_latent_stats(load_digits_split("train")[0])
    return rae.eval()


def build_digits_rae(folder: str | Path, mae_steps: int = 1500, decoder_steps: int = 0, noise_tau: float = 0.8,
                     norm_mode: str = "element", seed: int = 0, progress: bool = True, **kwargs: Any) -> RAE:
    """The digits RAE: MAE-pretrained encoder, latent statistics, optionally a trained decoder; saved to ``folder``.

    Args:
        folder: destination (written atomically).
        mae_steps: MAE pretraining steps on the digits training split (no labels).
        decoder_steps: decoder training steps (0 leaves the decoder untrained, for :class:`RAEDecoderModule`).
        noise_tau: ``τ`` of the decoder's noise augmentation.
        norm_mode: ``"element"`` or ``"channel"`` latent statistics.
        seed: seeds the encoder init, the MAE and the decoder training.
        progress: show progress bars.
        **kwargs: :func:`digits_autoencoder` sizes.

    Returns:
        The RAE (eval mode).
    """
    from difffeat.data import load_digits_split

    images = load_digits_split("train")[0]
    rae = RAE(digits_autoencoder(seed=seed, **kwargs), image_channels=1)
    pretrain_mae_encoder(rae.autoencoder, images, steps=mae_steps, seed=seed, progress=progress)
    rae.fit_latent_stats(images, mode=norm_mode)
    rae.set_noise_tau(noise_tau)
    if decoder_steps:
        train_decoder(rae, images, steps=decoder_steps, noise_tau=noise_tau, seed=seed, progress=progress)
    rae.save_pretrained(folder)
    return rae.eval()
