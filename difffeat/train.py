"""``DiffusionModule``: trains a diffusion backbone and saves it in diffusers format.

Objectives (the noising conventions live in :mod:`difffeat.noise`):

* ``"eps"``: DDPM, integer ``t`` uniform in ``[0, T-1]``, the network predicts the noise ε;
* ``"v"``: the same process, the network predicts ``v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x``;
* ``"flow"``: the SiT linear interpolant ``x_t = (1 - t) x + t ε`` with ``t ~ U[0, 1]`` (1 = noise) and
  velocity target ``v = ε - x``; the network's timestep input is ``t · T`` (see
  :class:`~difffeat.noise.FlowSchedule`).

The saved folder is a diffusers pipeline (``model_index.json``, ``unet/`` or ``transformer/``,
``scheduler/``, the attached plug-ins under ``plugins/``), so ``create_backbone(folder)`` loads it like
any downloaded checkpoint and, for a U-Net trained with ``"eps"``, ``DDPMPipeline.from_pretrained``
samples from it.
"""

from __future__ import annotations

import copy
import errno
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from difffeat.align import Alignment
from difffeat.backbones import create_backbone
from difffeat.plugins import attached_plugins, save_plugins
from difffeat.selfcond import SelfConditioning

__all__ = ["DiffusionModule", "PeriodicExport", "diffusion_loss", "save_pipeline"]

OBJECTIVES = ("eps", "v", "flow")
#: scheduler config per objective (the flow one is diffusers' flow-matching scheduler, shift 1 = plain SiT)
SCHEDULERS = {
    "eps": {"_class_name": "DDPMScheduler", "prediction_type": "epsilon"},
    "v": {"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"},
    "flow": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0},
}
#: pipeline folder layout per denoiser class: (component name, pipeline class written to model_index.json)
#: (a pixel-space ``UNet2DConditionModel`` has no diffusers pipeline of its own: its folder is written with the
#: generic ``DiffusionPipeline`` name and loads through :func:`~difffeat.backbones.create_backbone`; so does the
#: wide-head DiT of :mod:`difffeat.backbones.rae`)
LAYOUT = {"UNet2DModel": ("unet", "DDPMPipeline"), "DiTTransformer2DModel": ("transformer", "DiTPipeline"),
          "UNet2DConditionModel": ("unet", "DiffusionPipeline"),
          "DiTDHTransformer2DModel": ("transformer", "DiffusionPipeline")}


def noised_batch(module: DiffusionModule, x0: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noises one batch under the module's objective.

    Args:
        module: gives the objective and the backbone's schedule.
        x0: clean images ``(B, C, H, W)``.
        generator: for the noise and the timesteps (default: the global generator).

    Returns:
        ``(x_t, t, target)``: the noisy batch, the timesteps as the network sees them (integers for
        DDPM objectives, ``t · T`` as floats for flow) and the regression target.
    """
    schedule = module.backbone.schedule
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    n, steps = x0.shape[0], schedule.num_train_timesteps
    if module.objective == "flow":
        t = torch.rand(n, generator=generator, device=x0.device) * steps  # continuous t · T
    else:
        t = torch.randint(0, steps, (n,), device=x0.device, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if module.objective == "eps" else schedule.velocity(x0, noise, t)
    return x_t, t, target


def diffusion_loss(module: DiffusionModule, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between the network's prediction and the objective's target on one batch.

    A DiT that also predicts its variance (``out_channels = 2 C``) has only its first ``C`` channels
    trained: the mean prediction, as in DiT's simple loss without the VLB term.

    Args:
        module: the module whose backbone and objective are used.
        x0: clean images ``(B, C, H, W)``.
        generator: for the noise and the timesteps (seeded in validation, so the loss is comparable).

    Returns:
        The scalar loss.
    """
    x_t, t, target = noised_batch(module, x0, generator)
    pred = module.backbone(x_t, t)[:, : x0.shape[1]]
    return F.mse_loss(pred, target)


def _swap_in(new: Path, folder: Path, staging: Path) -> None:
    """Puts the finished folder ``new`` at ``folder``, replacing what is there.

    At every moment a complete model exists: at ``folder``, or, between the two renames, as
    ``staging/old*``.

    The old model is renamed aside (inside this export's own ``staging`` folder), the new one renamed
    in, and the old one deleted with ``staging`` by the caller. An error between the renames (a full
    disk, a ``KeyboardInterrupt``) renames the old model back. Another export renaming its model in
    at the same time makes our rename find the folder occupied: ours then moves that one aside too
    and retries, so the last export to finish wins and the folder is never a mix of two.
    """
    aside: Path | None = None
    try:
        for attempt in itertools.count():
            aside = staging / f"old{attempt}"
            try:
                os.replace(folder, aside)
            except FileNotFoundError:  # first export, or a concurrent one holds the folder aside right now
                aside = None
            try:
                os.replace(new, folder)
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # a concurrent export renamed its model in between: our aside copy is obsolete
    except BaseException:
        if aside is not None and aside.exists() and not folder.exists():
            os.replace(aside, folder)  # the old model goes back where a loader looks
        raise


def save_pipeline(model: torch.nn.Module, scheduler_config: dict[str, Any], folder: str | Path,
                  extra: dict[str, Any] | None = None, plugins: Sequence[torch.nn.Module] = (),
                  null_embedding: torch.Tensor | None = None) -> Path:
    """Saves ``model`` and its scheduler as a diffusers pipeline folder, atomically.

    The folder is written inside a uniquely named staging folder beside its destination
    (``.{name}.export-*``, so exports to one folder from threads or processes never share files) and
    renamed into place by :func:`_swap_in`: a crash at any point leaves a complete model, the old or
    the new one, never a half-saved folder where a loader would find it.

    Args:
        model: a diffusers denoiser (a class in ``LAYOUT``); saved as float32 on the CPU.
        scheduler_config: the scheduler's config dict (``_class_name`` names the diffusers class).
        folder: destination; replaced if it exists.
        extra: written to ``difffeat.json`` (training hyper-parameters, step).
        plugins: registered plug-ins attached to the model (self-conditioning, for one), saved to
            ``plugins/<name>/`` by :func:`~difffeat.plugins.save_plugins`; ``create_backbone``
            re-attaches them.
        null_embedding: a text-conditioned U-Net's fixed condition ``(1, L, D)``, saved to
            ``null_embedding.safetensors`` (key ``prompt_embeds``), where its adapter looks.

    Returns:
        ``folder`` as a ``Path``.
    """
    import diffusers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.export-"))
    try:
        tmp = staging / "new"  # made by save_pretrained, so with the usual permissions (mkdtemp's are 0700)
        component, pipeline = LAYOUT[type(model).__name__]
        scheduler = getattr(diffusers, scheduler_config.get("_class_name", "DDPMScheduler")).from_config(
            scheduler_config)
        copy.deepcopy(model).float().cpu().save_pretrained(tmp / component, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
                 component: ["diffusers", type(model).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "difffeat.json").write_text(json.dumps(extra or {}, indent=2, sort_keys=True, default=str))
        save_plugins(plugins, tmp)
        if null_embedding is not None:
            save_file({"prompt_embeds": null_embedding.detach().float().cpu().contiguous()},
                      str(tmp / "null_embedding.safetensors"))
        _swap_in(tmp, folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the replaced model, or the unfinished new one
    return folder


class DiffusionModule(L.LightningModule):
    """Trains a diffusers ``UNet2DModel``, ``DiTTransformer2DModel`` or pixel-space ``UNet2DConditionModel``.

    A ``UNet2DConditionModel`` trains on its fixed condition; EMA weights are kept.

    Args:
        backbone: a registered name or a local folder to start from.
        backbone_kwargs: extra arguments for ``create_backbone`` (e.g. ``seed`` of the random init).
        scheduler: overrides of the objective's scheduler config (DDPM: diffusers defaults, linear β
            1e-4 → 0.02, T = 1000).
        objective: ``"eps"`` (predict the noise, as DDPM), ``"v"`` (v-prediction) or ``"flow"`` (SiT
            linear interpolant, velocity prediction).
        lr: peak AdamW learning rate, reached after ``warmup_steps`` and decayed to 0 by a cosine
            (diffusers' ``get_cosine_schedule_with_warmup``: the first step runs at learning rate 0).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length.
        ema_decay: EMA decay (diffusers' ``EMAModel``); after ``n`` optimiser steps the effective decay
            is ``min(ema_decay, (1 + n) / (10 + n))``, so short runs are not dominated by the initial weights.
        export_dir: where the EMA model is saved as a diffusers pipeline when training ends.
        alignment: REPA / HASTE plug-in (:class:`~difffeat.align.Alignment`); its projector trains
            with the backbone, its teacher stays frozen and stops running after its ``stop_step``.
        self_conditioning: DDAE++ self-conditioning (:class:`~difffeat.selfcond.SelfConditioning`); its
            MLP becomes part of the backbone (trained, EMA-averaged and exported with it).

    Raises:
        ValueError: an unknown objective, or an alignment that does not fit the backbone.
    """

    def __init__(self, backbone: str = "unet2d-digits", backbone_kwargs: dict[str, Any] | None = None,
                 scheduler: dict[str, Any] | None = None, objective: str = "eps", lr: float = 2e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 50, ema_decay: float = 0.999,
                 export_dir: str | None = None, alignment: Alignment | None = None,
                 self_conditioning: SelfConditioning | None = None) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.save_hyperparameters(ignore=["alignment", "self_conditioning"])
        self.scheduler_config = {**SCHEDULERS[objective], **(scheduler or {})}
        self.backbone = create_backbone(backbone, scheduler=self.scheduler_config, **(backbone_kwargs or {}))
        self.backbone.set_self_conditioning(self_conditioning)
        self.backbone.requires_grad_(True).train()  # create_backbone returns eval mode; Lightning keeps modes
        self.ema = copy.deepcopy(self.backbone).requires_grad_(False).eval()
        # update_after_step=-1: the n-th update uses decay min(ema_decay, (1 + n) / (10 + n)); diffusers'
        # default (0) would make the first update a plain copy of the weights and shift the ramp by a step
        self._ema_updater = EMAModel([], decay=ema_decay, update_after_step=-1, foreach=True)
        self.objective, self.lr, self.weight_decay = objective, lr, weight_decay
        self.warmup_steps, self.ema_decay, self.export_dir = warmup_steps, ema_decay, export_dir
        self.alignment = alignment
        if alignment is not None:
            alignment.bind(self.backbone)

    def compute_loss(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss of one batch at optimisation step ``step`` and its named terms.

        The alignment plug-in's terms are added while it is active; from its ``stop_step`` on, the
        total is the diffusion loss alone and the teacher is not run.

        Args:
            images: clean images ``(B, C, H, W)``.
            step: the optimisation step (decides whether the alignment plug-in runs).

        Returns:
            The total loss and its terms (``"diffusion"``, plus the alignment's).
        """
        x_t, t, target = noised_batch(self, images)
        align = self.alignment is not None and self.alignment.active(step)
        with self.alignment.capture(self.backbone) if align else nullcontext({}) as found:
            pred = self.backbone(x_t, t)[:, : images.shape[1]]
        terms = {"diffusion": F.mse_loss(pred, target)}
        if align:
            terms.update(self.alignment.loss(found, images))
        return sum(terms.values()), terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss of one batch (``batch["image"]``), its terms logged under ``train/``."""
        loss, terms = self.compute_loss(batch["image"], self.global_step)
        self.log_dict({f"train/{k}": v for k, v in terms.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/loss`` with noise seeded by the batch index, so epochs are compared on equal noise."""
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)
        self.log("val/loss", diffusion_loss(self, batch["image"], gen), prog_bar=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update.

        The update is here rather than in ``on_train_batch_end`` because callbacks'
        ``on_train_batch_end`` (e.g. :class:`PeriodicExport`) run before the module's.
        """
        super().optimizer_step(*args, **kwargs)
        self.update_ema(self.global_step + 1)  # the step counter moves only after this hook returns

    @torch.no_grad()
    def update_ema(self, n: int) -> None:
        """One EMA step towards the current weights.

        The step is diffusers' ``EMAModel.step``, averaging into :attr:`ema`'s own parameters (so the
        averaged model is a module: moved with this one, saved in Lightning checkpoints, exported).
        Its step counter is set from ``n`` each time, so a resumed run continues the ramp where it was.
        Buffers (a DiT's position table, a fixed condition) are copied, not averaged.

        Args:
            n: optimiser steps taken, this one included (1 for the first update).
        """
        self._ema_updater.shadow_params = list(self.ema.parameters())
        self._ema_updater.optimization_step = n - 1  # step() counts this update
        self._ema_updater.step(list(self.backbone.parameters()))
        for b_ema, b in zip(self.ema.buffers(), self.backbone.buffers(), strict=True):
            b_ema.copy_(b)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the backbone (and the alignment projector), with a warm-up and cosine schedule.

        The schedule is diffusers' linear warm-up and cosine decay to 0 over the run's optimisation
        steps, stepped every step.
        """
        params = list(self.backbone.parameters())
        if self.alignment is not None:
            params += list(self.alignment.projector.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=self.warmup_steps, num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, folder: str | Path) -> Path:
        """Saves the EMA model, with its plug-ins (self-conditioning, if any), as a diffusers pipeline folder.

        Args:
            folder: destination (replaced atomically, see :func:`save_pipeline`).

        Returns:
            ``folder`` as a ``Path``.
        """
        return save_pipeline(self.ema.model, self.scheduler_config, folder, plugins=attached_plugins(self.ema),
                             extra={"hparams": dict(self.hparams), "global_step": self.global_step},
                             null_embedding=getattr(self.ema, "encoder_hidden_states", None))

    def on_train_end(self) -> None:
        """Exports the EMA model to ``export_dir`` (rank 0 only), if one is set."""
        if self.export_dir and self.trainer.is_global_zero:
            self.export(self.export_dir)


class PeriodicExport(L.Callback):
    """Saves the EMA model every ``every_n_steps`` optimisation steps to ``{export_dir}-step{N}``.

    Args:
        every_n_steps: period in optimisation steps.

    Raises:
        ValueError: ``every_n_steps < 1``.
    """

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        """Exports ``module`` (a :class:`DiffusionModule`) on rank 0 when the step count is a multiple."""
        step = trainer.global_step
        if step % self.every_n_steps == 0 and module.export_dir and trainer.is_global_zero:
            module.export(f"{module.export_dir}-step{step}")
