"""Representation alignment of a diffusion transformer to a frozen vision teacher: REPA and HASTE.

* **REPA** (Yu et al., 2024): the student's hidden tokens after block ``L`` go through an MLP projector
  (Linear → SiLU → Linear → SiLU → Linear) and are pulled towards the teacher's patch tokens of the
  *clean* image by the negative cosine similarity, averaged over batch and tokens; the total loss is
  ``diffusion + λ · REPA`` (λ = 0.5, ``L ≈ depth / 3`` by default).
* **HASTE** (Wang et al., 2025): adds attention-logit distillation, the cross-entropy between the
  teacher's attention (prefix rows and columns, CLS and registers, removed and re-softmaxed) and the
  student's log-softmax attention, over a map of student (block, head) to teacher (block, head)
  (coefficient 0.5 as in the paper's released commands), and stops *both* terms for good at
  ``stop_step``. After that step the teacher is never run again (the paper's code keeps running it
  and multiplies by zero).

The teacher is any timm ViT, loaded from a local checkpoint through timm's own pretrained-weights path
(``pretrained_cfg_overlay={"file": ...}``), which resamples position embeddings to the input size.
The teacher's input is the clean image resized so that its patch grid equals the student's token grid.

Student attention logits are read by a forward pre-hook on each mapped block's ``attn1`` that applies
the block's own ``to_q``/``to_k`` to the attention input: the same function of the same weights as the
attention inside, so gradients are exact, at the cost of two extra projections per mapped block. No
diffusers forward or processor is copied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.backbones.base import Backbone

__all__ = ["Alignment", "TimmTeacher", "attention_distillation_loss", "mlp_projector", "repa_loss"]


def mlp_projector(in_dim: int, out_dim: int, hidden: int = 2048) -> nn.Sequential:
    """REPA's projector: Linear → SiLU → Linear → SiLU → Linear.

    Args:
        in_dim: width of the student's tokens.
        out_dim: width of the teacher's tokens.
        hidden: width of the two hidden layers.
    """
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


def repa_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """REPA's loss: minus the cosine similarity of matching tokens, averaged over batch and tokens.

    Args:
        projected: ``(B, N, D)`` projected student tokens.
        teacher: ``(B, N, D)`` teacher tokens (token ``i`` of both is the same image patch).

    Returns:
        A scalar in ``[-1, 1]`` (``-1``: every pair points the same way).

    Raises:
        ValueError: the two shapes differ.
    """
    if projected.shape != teacher.shape:
        raise ValueError(f"student projection {tuple(projected.shape)} and teacher tokens "
                         f"{tuple(teacher.shape)} differ in shape")
    return -F.cosine_similarity(projected, teacher, dim=-1).mean()


def attention_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                prefix: int = 0) -> torch.Tensor:
    """Cross-entropy ``-Σ_j p_T(j) log p_S(j)``, averaged over batch and query rows.

    Args:
        student_logits: ``(B, N, N)`` pre-softmax attention of one student head.
        teacher_logits: ``(B, P + N, P + N)`` of one teacher head; its first ``prefix`` rows and
            columns (CLS and register tokens) are dropped and the rest re-softmaxed.
        prefix: number of teacher prefix tokens.

    Returns:
        The scalar loss (the KL divergence plus the teacher's entropy, which has no gradient).

    Raises:
        ValueError: the teacher's attention without its prefix and the student's differ in shape.
    """
    teacher_logits = teacher_logits[..., prefix:, prefix:]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher attention {tuple(teacher_logits.shape)} (prefix {prefix} removed) and "
                         f"student attention {tuple(student_logits.shape)} differ in shape")
    p_teacher = teacher_logits.softmax(-1)
    return -(p_teacher * student_logits.log_softmax(-1)).sum(-1).mean()


class TimmTeacher(nn.Module):
    """A frozen timm ViT giving patch tokens and per-block attention logits.

    Args:
        model_name: a timm architecture (``vit_small_patch14_dinov2``, ``vit_tiny_patch16_224``, …).
        checkpoint: a local weights file (safetensors or a ``weights_only`` torch file) for it.
        model_kwargs: architecture overrides (``patch_size``, ``embed_dim``, ``depth``, ``in_chans`` …),
            the same ones the checkpoint was made with.
    """

    def __init__(self, model_name: str, checkpoint: str | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model_name, self.checkpoint = model_name, checkpoint
        self.model_kwargs = dict(model_kwargs or {})
        self.model: nn.Module | None = None
        self.calls = 0  # forward count: termination is checked by tests through it

    def build(self, grid: tuple[int, int]) -> None:
        """Creates the ViT for an input whose patch grid is ``grid`` (position embeddings resampled).

        Args:
            grid: the student's token grid ``(h, w)``; the teacher's input is sized to give it.

        Raises:
            ValueError: ``model_kwargs`` fix an ``img_size`` whose patch grid is another one.
        """
        import timm

        probe = timm.create_model(self.model_name, pretrained=False, **self.model_kwargs)
        patch = probe.patch_embed.patch_size
        size = (grid[0] * patch[0], grid[1] * patch[1])
        if "img_size" in self.model_kwargs:  # a fixed input size must give the student's grid
            fixed = tuple(probe.patch_embed.grid_size)
            if fixed != tuple(grid):
                raise ValueError(f"teacher {self.model_name} with img_size {self.model_kwargs['img_size']} has a "
                                 f"{fixed[0]}x{fixed[1]} patch grid; the student's token grid is "
                                 f"{grid[0]}x{grid[1]}: drop img_size to let difffeat resize the input")
        kwargs = {**self.model_kwargs, "img_size": size, "num_classes": 0}
        if self.checkpoint is not None:
            model = timm.create_model(self.model_name, pretrained=True,
                                      pretrained_cfg_overlay={"file": str(self.checkpoint)}, **kwargs)
        else:
            model = timm.create_model(self.model_name, pretrained=False, **kwargs)
        self.model = model.requires_grad_(False).eval()
        cfg = model.pretrained_cfg
        chans = model.patch_embed.proj.in_channels
        mean = torch.tensor(cfg.get("mean", (0.5,) * chans))[:chans].view(1, -1, 1, 1)
        std = torch.tensor(cfg.get("std", (0.5,) * chans))[:chans].view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.input_size, self.grid = size, grid

    def train(self, mode: bool = True) -> TimmTeacher:
        """Sets this module's mode; the ViT itself stays in eval mode (frozen, its dropout off)."""
        super().train(mode)
        if self.model is not None:
            self.model.eval()  # frozen: never in train mode
        return self

    @property
    def depth(self) -> int:
        """Number of ViT blocks."""
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        """Attention heads per block."""
        return self.model.blocks[0].attn.num_heads

    @property
    def dim(self) -> int:
        """Token width (the projector's output size)."""
        return self.model.embed_dim

    @property
    def prefix(self) -> int:
        """Prefix tokens (CLS and registers) before the patch tokens."""
        return self.model.num_prefix_tokens

    @torch.no_grad()
    def forward(self, images: torch.Tensor, attention_blocks: Sequence[int] = ()
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Runs the frozen ViT on clean images.

        Args:
            images: ``(B, C, H, W)`` in ``[-1, 1]``; resized to the teacher's input size, a grey image
                repeated over a colour teacher's channels.
            attention_blocks: blocks whose attention logits are returned.

        Returns:
            Patch tokens ``(B, N, D)`` (prefix tokens removed) and, per requested block, attention logits
            ``(B, H, P + N, P + N)``.

        Raises:
            ValueError: the images' channels cannot be fed to the teacher.
        """
        self.calls += 1
        x = F.interpolate(images.float(), size=self.input_size, mode="bilinear", align_corners=False,
                          antialias=True)
        chans = self.mean.shape[1]
        if x.shape[1] != chans:
            if x.shape[1] != 1:
                raise ValueError(f"teacher takes {chans} channels, images have {x.shape[1]}")
            x = x.expand(-1, chans, -1, -1)
        x = ((x + 1) / 2 - self.mean) / self.std
        logits: dict[int, torch.Tensor] = {}

        def make_hook(b: int, attn: nn.Module):
            def hook(_m: nn.Module, _i: Any, qkv: torch.Tensor) -> None:
                n = qkv.shape[1]
                q, k, _ = qkv.reshape(qkv.shape[0], n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = attn.q_norm(q), attn.k_norm(k)
                logits[b] = (q * attn.scale) @ k.transpose(-2, -1)

            return hook

        handles = [self.model.blocks[b].attn.qkv.register_forward_hook(make_hook(b, self.model.blocks[b].attn))
                   for b in attention_blocks]
        try:
            tokens = self.model.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        return tokens[:, self.prefix:], logits


class Alignment(nn.Module):
    """REPA, optionally with HASTE's attention distillation and termination, as a DiffusionModule plug-in.

    Args:
        teacher: the frozen teacher.
        depth: student block ``L`` whose output is aligned (1-based; default ``round(depth / 3)``).
        weight: λ of the REPA term.
        projector_dim: hidden width of the projector.
        attention_weight: coefficient of the attention term (0 = plain REPA).
        attention_pairs: ``[student_block, student_head, teacher_block, teacher_head]`` rows (0-based);
            default: every head of student blocks ``0 … L-1`` to the same head index of the teacher
            block at the same relative depth (heads beyond the teacher's count are skipped).
        stop_step: optimisation step from which both terms are off for good and the teacher is not run
            (``None`` = never, plain REPA).
    """

    def __init__(self, teacher: TimmTeacher, depth: int | None = None, weight: float = 0.5,
                 projector_dim: int = 2048, attention_weight: float = 0.0,
                 attention_pairs: list[list[int]] | None = None, stop_step: int | None = None) -> None:
        super().__init__()
        if stop_step is not None and stop_step < 0:
            raise ValueError(f"stop_step must be >= 0 (or None for never), got {stop_step}")
        self.teacher, self.depth, self.weight = teacher, depth, weight
        self.projector_dim, self.attention_weight = projector_dim, attention_weight
        self.attention_pairs, self.stop_step = attention_pairs, stop_step
        self.projector: nn.Module | None = None

    def bind(self, backbone: Backbone) -> None:
        """Checks the student against the teacher and builds the projector.

        Every mismatch is an error here, before any training step.

        Args:
            backbone: the student, a transformer adapter (``transformer_blocks``).

        Raises:
            TypeError: the student has no transformer blocks.
            ValueError: the depth or an attention pair is out of range, or the teacher's token grid is
                not the student's.
        """
        blocks = getattr(backbone.model, "transformer_blocks", None)
        if blocks is None:
            raise TypeError(f"alignment needs a transformer student with transformer_blocks; got "
                            f"{type(backbone.model).__name__}")
        n_blocks = len(blocks)
        self.depth = self.depth if self.depth is not None else max(1, round(n_blocks / 3))
        if not 1 <= self.depth <= n_blocks:
            raise ValueError(f"alignment depth {self.depth} out of range: the student has blocks 1 … {n_blocks}")
        grid = backbone.feature_info[f"transformer_blocks.{self.depth - 1}"].grid
        self.teacher.build(grid)
        student_tokens, teacher_tokens = grid[0] * grid[1], self.teacher.grid[0] * self.teacher.grid[1]
        if student_tokens != teacher_tokens:  # REPA compares token i with token i: the grids must match
            raise ValueError(
                f"token counts differ: the student's block {self.depth} gives {student_tokens} tokens "
                f"({grid[0]}x{grid[1]}), the teacher {self.teacher.model_name} "
                f"gives {teacher_tokens} ({self.teacher.grid[0]}x{self.teacher.grid[1]}); change the teacher's "
                f"patch_size or input size so that its patch grid is {grid[0]}x{grid[1]} (or leave img_size "
                f"unset, so that difffeat resizes the teacher's input to that grid)")
        heads = blocks[0].attn1.heads
        if self.attention_pairs is None:
            td = self.teacher.depth  # student block b ↔ the teacher block at the same relative depth
            self.attention_pairs = [[b, h, min(td - 1, (b + 1) * td // self.depth - 1), h]
                                    for b in range(self.depth) for h in range(min(heads, self.teacher.num_heads))]
        for sb, sh, tb, th in self.attention_pairs:
            if not (0 <= sb < n_blocks and 0 <= sh < heads):
                raise ValueError(f"attention pair {[sb, sh, tb, th]}: the student has blocks 0 … {n_blocks - 1} "
                                 f"with heads 0 … {heads - 1}")
            if not (0 <= tb < self.teacher.depth and 0 <= th < self.teacher.num_heads):
                raise ValueError(f"attention pair {[sb, sh, tb, th]}: the teacher has blocks 0 … "
                                 f"{self.teacher.depth - 1} with heads 0 … {self.teacher.num_heads - 1}")
        dim = backbone.feature_info[f"transformer_blocks.{self.depth - 1}"].channels
        self.projector = mlp_projector(dim, self.teacher.dim, self.projector_dim)

    def active(self, step: int) -> bool:
        """Whether the alignment terms (and the teacher) run at optimisation step ``step``.

        Args:
            step: the optimisation step (0 for the first).
        """
        return self.stop_step is None or step < self.stop_step

    @property
    def uses_attention(self) -> bool:
        """Whether the HASTE attention term is on (a positive weight and at least one head pair)."""
        return self.attention_weight > 0 and bool(self.attention_pairs)

    @contextmanager
    def capture(self, backbone: Backbone) -> Iterator[dict[str, Any]]:
        """Hooks that record the block-``L`` tokens and the mapped heads' attention logits.

        They record during the student's forward.

        Args:
            backbone: the bound student.

        Yields:
            A dict filled by the forward run inside the context: ``"tokens"`` ``(B, N, D)`` and
            ``"attention"`` (student block → logits ``(B, H, N, N)``); pass it to :meth:`loss`.
        """
        found: dict[str, Any] = {"attention": {}}
        blocks = backbone.model.transformer_blocks

        def keep_tokens(_m: nn.Module, _i: Any, out: Any) -> None:
            found["tokens"] = out[0] if isinstance(out, tuple) else out

        def make_attn_hook(b: int, attn: nn.Module):
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                q = attn.to_q(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                k = attn.to_k(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                if attn.norm_q is not None:
                    q, k = attn.norm_q(q), attn.norm_k(k)
                found["attention"][b] = (q @ k.transpose(-2, -1)) * attn.scale

            return hook

        handles = [blocks[self.depth - 1].register_forward_hook(keep_tokens)]
        if self.uses_attention:
            for b in sorted({p[0] for p in self.attention_pairs}):
                handles.append(blocks[b].attn1.register_forward_pre_hook(make_attn_hook(b, blocks[b].attn1),
                                                                         with_kwargs=True))
        try:
            yield found
        finally:
            for h in handles:
                h.remove()

    def loss(self, found: dict[str, Any], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted alignment terms for one batch (runs the teacher on the clean ``images``).

        Args:
            found: what :meth:`capture` recorded during the student's forward on this batch.
            images: the batch's clean images.

        Returns:
            ``{"repa": λ · REPA}``, plus ``"attention"`` (weighted HASTE term) when it is on.
        """
        teacher_blocks = sorted({p[2] for p in self.attention_pairs}) if self.uses_attention else []
        tokens, teacher_logits = self.teacher(images, teacher_blocks)
        out = {"repa": self.weight * repa_loss(self.projector(found["tokens"]), tokens.to(found["tokens"].dtype))}
        if self.uses_attention:
            terms = [attention_distillation_loss(found["attention"][sb][:, sh], teacher_logits[tb][:, th],
                                                 self.teacher.prefix)
                     for sb, sh, tb, th in self.attention_pairs]
            out["attention"] = self.attention_weight * torch.stack(terms).mean()
        return out
