"""CT standardization: DiffusionCT's two-stage latent diffusion model and a direct U-Net baseline.

The model follows DiffusionCT (Selim et al., "DiffusionCT: Latent Diffusion Model for CT Image
Standardization", 2023; "Latent Diffusion Model for Medical Image Standardization and Enhancement",
2023): an encoder–decoder is trained alone to reconstruct scans (stage 1); then, with encoder and decoder
frozen, a DDPM at the bottleneck learns to map the latent of a non-standard scan to the latent of the
standard scan of the same anatomy, conditioned on the source latent (stage 2); the decoder synthesises the
standardized scan from the sampled latent. The paper has no public code; every choice it leaves open is
written here.

* **Normalisation** (HU-aware): HU clipped to ``(-1024, 1024)`` and mapped to ``[-1, 1]``
  (:func:`~difffeat.data.ct.normalize_hu`); outputs are mapped back and clipped.
* **Stage 1** (:class:`CTAutoencoder`, :class:`CTAutoencoderModule`): diffusers' VAE ``Encoder`` /
  ``Decoder`` (ResNet down / up blocks, a mid block), used deterministically (``double_z=False``, no KL
  term: the paper's encoder–decoder is not variational), one input / output channel, ``latent_channels``
  (4) at stride ``2 ** (len(channels) - 1)`` (4: a 16 × 16 latent for 64-px slices). **No skip
  connections** between encoder and decoder: the paper calls its network "U-Net-based", but skips would
  carry the non-standard scan's high-frequency texture (the very thing to standardize) around the
  bottleneck where the DDPM acts, so the decoder sees only the latent. Loss: L1 on the normalised
  reconstructions of both the source and the standard scan of each pair (the paper's loss is not
  given; L1 keeps edges and noise texture sharper than L2).
* **Stage 2** (:class:`LatentDDPM`, :class:`DiffusionCTModule`): a diffusers ``UNet2DModel`` on the
  latent grid whose input is the noisy standard latent concatenated with the source latent along
  channels (the conditioning; the paper says only "conditioned"), diffusers' ``DDPMScheduler`` (1000
  steps, linear betas, Ho et al.'s defaults, no clipping: latents have no range) for training,
  ``DDIMScheduler`` from the same config for sampling (``sample_steps`` 20, η = 0: CPU scale; the paper
  samples with DDPM). The prediction target is a setting (``prediction_type``); the class default is ε, the
  paper's DDPM, and ``configs/ct_stage2.yaml`` predicts the clean latent (``sample``): source → standard is
  nearly deterministic, and at this CPU budget x0-prediction learns it far sooner
  (``experiments/ct_stage2_objective.py`` measures the three targets at equal steps). Latents are scaled
  by ``1 / std`` of the first training batch's latents (the latent-diffusion scaling factor, stored as a
  buffer). Sampling starts from one seeded noise map shared by every image,
  so a standardized scan depends neither on its batch nor on the global random state.
* **Frozen means frozen**: the autoencoder of stage 2 has ``requires_grad_(False)``, stays in eval mode,
  is out of the optimizer and out of Lightning checkpoints (:class:`~heads.base.FrozenPartState`); it is
  read from stage 1's export folder given in the config (``checkpoint:``; ``autoencoder_config`` states
  the architecture and is checked against it).
* **Baseline** (:class:`UNetStandardizerModule`): an SMP U-Net (untrained ``resnet18`` encoder, depth
  3) regressing the standard scan directly, as a residual (``x + U(x)``), L1 loss; the experiment gives it
  as many steps as stage 1 and stage 2 together.

Exchange format: every module's ``export_dir`` receives, when fitting ends, a folder with ``config.json``
(``class_path`` and ``init_args``) and ``model.safetensors`` (every weight, the frozen ones included),
written atomically; :func:`load_standardizer` rebuilds a module from it (only the classes of
:data:`CT_MODULES`, weights as tensors only) and :func:`standardize_folder` turns a folder of DICOM
slices into a new, derived DICOM series.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difffeat.data.ct import denormalize_hu, normalize_hu
from difffeat.store import replace_folder
from heads.base import FrozenPartState
from heads.ct_metrics import CTStandardizationMetrics, psnr_ssim

__all__ = ["CT_MODULES", "CTAutoencoder", "CTAutoencoderModule", "CTModule", "DiffusionCTModule", "LatentDDPM",
           "UNetStandardizerModule", "load_standardizer", "standardize_folder"]

_CONFIG, _WEIGHTS = "config.json", "model.safetensors"
#: the stage-1 arguments that fix the autoencoder's architecture
_AUTOENCODER_ARGS = ("channels", "latent_channels", "layers_per_block", "norm_num_groups", "attention")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _check(x: torch.Tensor, multiple: int, what: str = "CT batch") -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{what}: expected (B, 1, H, W) normalised slices, got {tuple(x.shape)}")
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(f"{what} {tuple(x.shape)}: height and width must be multiples of {multiple}")


# ------------------------------------------------------------------------------------------------ networks


class CTAutoencoder(nn.Module):
    """Stage 1's deterministic encoder–decoder without skips (see the module docstring).

    Args:
        channels: widths of the resolution levels (``len - 1`` downsamplings).
        latent_channels: bottleneck channels.
        layers_per_block: ResNet layers per level.
        norm_num_groups: group-norm groups (divides every width).
        attention: self-attention in the encoder's and decoder's mid blocks.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), latent_channels: int = 4, layers_per_block: int = 1,
                 norm_num_groups: int = 8, attention: bool = False) -> None:
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        super().__init__()
        channels = tuple(int(c) for c in channels)
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"every width of {channels} must be a multiple of norm_num_groups={norm_num_groups}")
        n = len(channels)
        self.encoder = Encoder(in_channels=1, out_channels=latent_channels,
                               down_block_types=("DownEncoderBlock2D",) * n, block_out_channels=channels,
                               layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, double_z=False, mid_block_add_attention=attention)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=1, up_block_types=("UpDecoderBlock2D",) * n,
                               block_out_channels=channels, layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, mid_block_add_attention=attention)
        self.latent_channels, self.stride = latent_channels, 2 ** (n - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` normalised slices → ``(B, latent_channels, H / stride, W / stride)``."""
        _check(x, self.stride)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents → ``(B, 1, H, W)`` normalised slices."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction."""
        return self.decode(self.encode(x))


class LatentDDPM(nn.Module):
    """A conditional DDPM on latents: ``UNet2DModel`` on ``[z_t, z_source]``, DDPM training, DDIM sampling.

    Args:
        latent_channels: latent channels (the input has twice as many: noisy target and condition).
        block_out_channels: U-Net widths per level.
        layers_per_block: ResNet layers per level.
        norm_num_groups: group-norm groups.
        num_train_timesteps: DDPM steps.
        beta_schedule: diffusers beta schedule.
        prediction_type: ``"epsilon"`` (default), ``"sample"`` or ``"v_prediction"``.
        sample_steps: DDIM steps at inference.
    """

    def __init__(self, latent_channels: int = 4, block_out_channels: Sequence[int] = (32, 64),
                 layers_per_block: int = 1, norm_num_groups: int = 8, num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear", prediction_type: str = "epsilon", sample_steps: int = 20) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

        super().__init__()
        n = len(block_out_channels)
        self.unet = UNet2DModel(in_channels=2 * latent_channels, out_channels=latent_channels,
                                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                                norm_num_groups=norm_num_groups)
        # clip_sample=False: latents have no [-1, 1] range (diffusers' DDPM/DDIM default clips the predicted x0
        # to it, which cut every unit-std latent value beyond ±1 at each sampling step)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       prediction_type=prediction_type, clip_sample=False)
        self.sampler = DDIMScheduler.from_config(self.scheduler.config)
        self.sample_steps, self.stride = sample_steps, 2 ** (n - 1)

    def loss(self, target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """The DDPM loss (MSE on the scheduler's prediction type) of mapping ``source`` latents to ``target``."""
        # drawn on the CPU generator, then moved: the same draws on every device
        noise = torch.randn(target.shape, generator=generator).to(target)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (target.shape[0],),
                          generator=generator).to(target.device)
        noisy = self.scheduler.add_noise(target, noise, t)
        out = self.unet(torch.cat([noisy, source], 1), t).sample
        kind = self.scheduler.config.prediction_type
        goal = {"epsilon": noise, "sample": target}.get(kind)
        if goal is None:
            goal = self.scheduler.get_velocity(target, noise, t)
        return F.mse_loss(out, goal)

    @torch.no_grad()
    def sample(self, source: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """DDIM sampling (η = 0) of target latents given ``source`` latents; one seeded noise map for every row."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn((1, *source.shape[1:]), generator=g).to(source).expand_as(source).clone()
        self.sampler.set_timesteps(self.sample_steps, device=source.device)
        for t in self.sampler.timesteps:
            out = self.unet(torch.cat([z, source], 1), t).sample
            z = self.sampler.step(out, t, z, eta=0.0).prev_sample
        return z


# ---------------------------------------------------------------------------------------- lightning modules


class CTModule(L.LightningModule):
    """Shared training / evaluation / export of the CT standardization models.

    A subclass builds its network and implements :meth:`losses` and :meth:`standardize` (normalised in,
    normalised out). Validation logs PSNR / SSIM (2048-HU range) and the mean absolute HU error of the
    output against the standard scan; test logs :class:`~heads.ct_metrics.CTStandardizationMetrics`
    (PSNR, SSIM, per-feature CCC).

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        image_size: the slice side the model was trained on (used by :func:`standardize_folder`).
        export_dir: folder written when fitting ends (``None``: none).
        seed: the seed of the training noise draws and of sampling.
    """

    size_multiple = 1

    def __init__(self, lr: float, weight_decay: float, image_size: int, export_dir: str | None, seed: int) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.image_size, self.export_dir, self.seed = (
            lr, weight_decay, image_size, export_dir, seed)
        self.test_metrics = CTStandardizationMetrics()
        self._generator: torch.Generator | None = None

    def generator(self) -> torch.Generator:
        """The training-noise generator (seeded once; on the CPU, the device of the project)."""
        if self._generator is None:
            self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return self._generator

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training losses (``"loss"`` is optimised)."""
        raise NotImplementedError

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` normalised slices → standardized normalised slices."""
        raise NotImplementedError

    def evaluated(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output HU, reference HU)`` scored in validation and test: the standardized source vs the standard."""
        return denormalize_hu(self.standardize(batch["source"])), batch["target_hu"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One step on the pairs' losses."""
        losses = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["source"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """PSNR, SSIM and mean absolute HU error of the outputs."""
        out, ref = self.evaluated(batch)
        psnr, ssim = psnr_ssim(out, ref)
        n = len(out)
        self.log_dict({"val/psnr": psnr.mean(), "val/ssim": ssim.mean(), "val/mae_hu": (out - ref).abs().mean()},
                      prog_bar=True, batch_size=n)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulates the test metrics."""
        out, ref = self.evaluated(batch)
        self.test_metrics.update(out, ref, batch["labels"])

    def on_test_epoch_end(self) -> None:
        """Logs PSNR, SSIM, the mean CCC and each feature's CCC."""
        values = self.test_metrics.compute()
        self.log_dict({f"test/{k}": v for k, v in values.items() if np.isfinite(v)})
        self.test_metrics.reset()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates."""
        return (p for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over :meth:`trainable_parameters`."""
        return torch.optim.AdamW(list(self.trainable_parameters()), lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ export
    def export_args(self) -> dict[str, Any]:
        """The ``init_args`` an exported module is rebuilt with (``export_dir`` dropped)."""
        args = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # LightningCLI adds _class_path
        args.pop("export_dir", None)
        return args

    def export(self, folder: str | Path) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` (every weight) into ``folder``, atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
                     for k, v in nn.Module.state_dict(self).items()}  # frozen parts included
            save_file(state, str(tmp / _WEIGHTS))
            spec = {"class_path": f"{type(self).__module__}.{type(self).__name__}", "init_args": self.export_args()}
            (tmp / _CONFIG).write_text(json.dumps(spec, indent=2, sort_keys=True))
            replace_folder(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def on_fit_end(self) -> None:
        """Exports to ``export_dir`` (when given) on the main process."""
        if self.export_dir is not None and self.trainer.is_global_zero:
            self.export(self.export_dir)


class CTAutoencoderModule(CTModule):
    """Stage 1: the encoder–decoder trained alone to reconstruct scans (both scans of every pair).

    Validation and test score the reconstruction of the standard scan (this stage standardizes nothing).

    Args:
        channels: :class:`CTAutoencoder` widths.
        latent_channels: bottleneck channels.
        layers_per_block: ResNet layers per level.
        norm_num_groups: group-norm groups.
        attention: mid-block attention.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        image_size: training slice side.
        export_dir: export folder written when fitting ends (stage 2 reads it).
        seed: seed (unused by the loss; kept for a uniform interface).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), latent_channels: int = 4, layers_per_block: int = 1,
                 norm_num_groups: int = 8, attention: bool = False, lr: float = 1e-3, weight_decay: float = 0.0,
                 image_size: int = 64, export_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(lr, weight_decay, image_size, export_dir, seed)
        self.save_hyperparameters()
        self.autoencoder = CTAutoencoder(channels, latent_channels, layers_per_block, norm_num_groups, attention)
        self.size_multiple = self.autoencoder.stride

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """L1 reconstruction of the source and of the standard scan."""
        x = torch.cat([batch["source"], batch["target"]])
        return {"loss": F.l1_loss(self.autoencoder(x), x)}

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction (stage 1 does not standardize)."""
        return self.autoencoder(x)

    def evaluated(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction of the standard scan vs the standard scan."""
        return denormalize_hu(self.autoencoder(batch["target"])), batch["target_hu"]


def _read_export(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a CT model export (needs {_CONFIG} and {_WEIGHTS}); fit the model "
                                f"with export_dir set first")
    spec = json.loads((folder / _CONFIG).read_text())
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{folder / _CONFIG} does not name a class_path")
    return spec, load_file(str(folder / _WEIGHTS))


class DiffusionCTModule(FrozenPartState, CTModule):
    """Stage 2: frozen stage-1 encoder / decoder, a conditional DDPM at the bottleneck (see the module docstring).

    Args:
        checkpoint: stage 1's export folder (its ``config.json`` and weights are read); ``None``: an
            untrained autoencoder built from ``autoencoder_config`` (how an export of this module is rebuilt,
            whose weights then hold the trained one).
        autoencoder_config: :class:`CTAutoencoder` arguments; with ``checkpoint``, checked against the export.
        block_out_channels: latent U-Net widths.
        layers_per_block: latent U-Net ResNet layers per level.
        norm_num_groups: group-norm groups.
        num_train_timesteps: DDPM steps.
        beta_schedule: diffusers beta schedule.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        sample_steps: DDIM steps at inference.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        image_size: slice side (default: stage 1's).
        export_dir: export folder written when fitting ends.
        seed: seed of the training noise and of sampling.

    Raises:
        FileNotFoundError: ``checkpoint`` is not an export folder.
        ValueError: neither ``checkpoint`` nor ``autoencoder_config``; an export of another class; an
            ``autoencoder_config`` that differs from the export's (the differing keys named).
    """

    frozen_prefix = "autoencoder."

    def __init__(self, checkpoint: str | None = None, autoencoder_config: dict[str, Any] | None = None,
                 block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1, norm_num_groups: int = 8,
                 num_train_timesteps: int = 1000, beta_schedule: str = "linear", prediction_type: str = "epsilon",
                 sample_steps: int = 20, lr: float = 2e-4, weight_decay: float = 0.0, image_size: int | None = None,
                 export_dir: str | None = None, seed: int = 0) -> None:
        state = None
        if checkpoint is not None:
            spec, weights = _read_export(checkpoint)
            if spec["class_path"] != f"{__name__}.CTAutoencoderModule":
                raise ValueError(f"{checkpoint} holds a {spec['class_path']}, expected a stage-1 "
                                 f"{__name__}.CTAutoencoderModule export")
            args = spec["init_args"]
            stored = {k: args[k] for k in _AUTOENCODER_ARGS}
            if autoencoder_config is not None:
                given = {**stored, **autoencoder_config}
                diff = sorted(k for k in given if k not in stored or _plain(given[k]) != _plain(stored[k]))
                if diff:
                    raise ValueError(f"autoencoder_config differs from stage 1's export {checkpoint} in "
                                     f"{', '.join(diff)}: {[(k, given[k], stored.get(k)) for k in diff]}")
            autoencoder_config = stored
            image_size = image_size or args.get("image_size")
            state = {k[len("autoencoder."):]: v for k, v in weights.items() if k.startswith("autoencoder.")}
        elif autoencoder_config is None:
            raise ValueError("give stage 1's export folder (checkpoint) or its autoencoder_config")
        super().__init__(lr, weight_decay, image_size or 64, export_dir, seed)
        self.save_hyperparameters()
        self.autoencoder_config = dict(autoencoder_config)
        self.autoencoder = CTAutoencoder(**autoencoder_config)
        if state is not None:
            self.autoencoder.load_state_dict(state, strict=True)
        self.autoencoder.requires_grad_(False).eval()
        self.diffusion = LatentDDPM(self.autoencoder.latent_channels, block_out_channels, layers_per_block,
                                    norm_num_groups, num_train_timesteps, beta_schedule, prediction_type, sample_steps)
        self.register_buffer("latent_scale", torch.zeros(()))
        self.size_multiple = self.autoencoder.stride * self.diffusion.stride

    def export_args(self) -> dict[str, Any]:
        """Rebuilt from the stored autoencoder config (the export holds its weights), not from a path."""
        args = super().export_args()
        args["checkpoint"] = None
        args["autoencoder_config"] = dict(self.autoencoder_config)
        args["image_size"] = self.image_size
        return args

    def train(self, mode: bool = True) -> DiffusionCTModule:
        """Train mode for the DDPM; the frozen autoencoder stays in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def on_fit_start(self) -> None:
        """Checks the autoencoder is frozen before any step."""
        if any(p.requires_grad for p in self.autoencoder.parameters()):
            raise RuntimeError("the stage-1 autoencoder of DiffusionCT has trainable parameters")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The DDPM's parameters; never the autoencoder's."""
        return self.unfrozen_parameters()

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents of normalised slices (the frozen encoder under no-grad)."""
        _check(x, self.size_multiple)
        return self.autoencoder.encode(x) * self.latent_scale

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The conditional DDPM loss: source latent → standard latent."""
        if self.latent_scale == 0:  # the latent-diffusion scaling factor, from the first training batch
            with torch.no_grad():
                z = self.autoencoder.encode(torch.cat([batch["source"], batch["target"]]))
                self.latent_scale.fill_(1.0 / float(z.std().clamp_min(1e-6)))
        return {"loss": self.diffusion.loss(self.latents(batch["target"]), self.latents(batch["source"]),
                                            self.generator())}

    @torch.no_grad()
    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Encode, DDIM-sample the standard latent given the source latent, decode."""
        if self.latent_scale == 0:
            raise RuntimeError("DiffusionCT has not been trained: its latent scale is unset")
        z = self.diffusion.sample(self.latents(x), self.seed)
        return self.autoencoder.decode(z / self.latent_scale)


class UNetStandardizerModule(CTModule):
    """Baseline: an SMP U-Net regressing the standard scan from the source scan, as a residual.

    Args:
        encoder_name: SMP encoder (random init: ``encoder_weights`` is always ``None``).
        encoder_depth: encoder stages (output stride ``2 ** depth``).
        decoder_channels: decoder widths, one per stage.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        image_size: training slice side.
        export_dir: export folder written when fitting ends.
        seed: seed.
    """

    def __init__(self, encoder_name: str = "resnet18", encoder_depth: int = 3,
                 decoder_channels: Sequence[int] = (64, 32, 16), lr: float = 1e-3, weight_decay: float = 0.0,
                 image_size: int = 64, export_dir: str | None = None, seed: int = 0) -> None:
        import segmentation_models_pytorch as smp

        super().__init__(lr, weight_decay, image_size, export_dir, seed)
        self.save_hyperparameters()
        self.unet = smp.Unet(encoder_name=encoder_name, encoder_weights=None, encoder_depth=encoder_depth,
                             decoder_channels=list(decoder_channels), in_channels=1, classes=1)
        self.size_multiple = 2 ** encoder_depth

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``x + U(x)``."""
        _check(x, self.size_multiple)
        return x + self.unet(x)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """L1 to the standard scan (normalised)."""
        return {"loss": F.l1_loss(self.standardize(batch["source"]), batch["target"])}


#: the classes :func:`load_standardizer` builds, by class path
CT_MODULES: dict[str, type[CTModule]] = {f"{__name__}.{c.__name__}": c for c in
                                         (CTAutoencoderModule, DiffusionCTModule, UNetStandardizerModule)}


def load_standardizer(folder: str | Path) -> CTModule:
    """A CT module rebuilt from its export folder (``config.json`` + ``model.safetensors``), in eval mode.

    Raises:
        FileNotFoundError: not an export folder.
        KeyError: the class is not one of :data:`CT_MODULES` (listed).
        ValueError: weights that do not fit.
    """
    spec, weights = _read_export(folder)
    cls = CT_MODULES.get(spec["class_path"])
    if cls is None:
        raise KeyError(f"{folder}: class {spec['class_path']!r} is not a CT model; expected one of "
                       f"{', '.join(CT_MODULES)}")
    module = cls(**spec["init_args"])
    try:
        nn.Module.load_state_dict(module, weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}: weights do not fit {spec['class_path']}: {e}") from e
    return module.eval()


@torch.no_grad()
def _run(model: CTModule, hu: np.ndarray, size: int) -> np.ndarray:
    h, w = hu.shape
    x = torch.from_numpy(np.ascontiguousarray(hu, np.float32))[None, None]
    x = F.interpolate(normalize_hu(x), (size, size), mode="bilinear", align_corners=False, antialias=True)
    y = model.standardize(x.to(next(model.parameters()).device)).cpu()
    y = F.interpolate(y, (h, w), mode="bilinear", align_corners=False)
    return denormalize_hu(y)[0, 0].numpy()


def standardize_folder(checkpoint: str | Path, input_dir: str | Path, output_dir: str | Path,
                       size: int | None = None, overwrite: bool = False,
                       description: str = "standardized (DiffusionCT)") -> list[Path]:
    """Standardizes a folder of CT DICOM slices (one series) into a new DICOM series folder, all or nothing.

    Every slice is read and checked first (:func:`~difffeat.data.ct.read_series`: a bad file fails before
    anything is written), resized to the model's side, standardized, resized back to its own size and
    written by :func:`~difffeat.data.ct.write_dicom_series` under its own file name (new series and
    instance UIDs, derived ``ImageType``, the source's geometry and rescale tags).

    CPU-scale limit: the models are trained on 64-px slices; a 512-px slice passes through a 64-px model
    and is upsampled back, so its fine detail is the model's, at that resolution.

    Args:
        checkpoint: an export folder of a CT model (stage 2, the U-Net baseline, or stage 1).
        input_dir: folder of DICOM slices.
        output_dir: folder to create.
        size: model side (default: the model's ``image_size``).
        overwrite: replace an existing ``output_dir``.
        description: ``SeriesDescription`` of the new series.

    Returns:
        The written files.

    Raises:
        FileExistsError: ``output_dir`` exists and ``overwrite`` is off.
        difffeat.data.ct.CTFileError: a bad input file (named).
    """
    from difffeat.data.ct import read_series, write_dicom_series

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {output_dir} exists; remove it or pass overwrite=True")
    slices = read_series(input_dir)
    model = load_standardizer(checkpoint)
    size = size or model.image_size
    if size % model.size_multiple:
        raise ValueError(f"size {size} must be a multiple of {model.size_multiple} for {type(model).__name__}")
    out = [(_run(model, s.hu, size), s.header) for s in slices]
    return write_dicom_series(out, output_dir, description, overwrite, names=[s.path.name for s in slices])
