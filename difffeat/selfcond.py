"""DDAE++-style self-conditioning: the network's own mid-level features condition its decoding layers.

The paper's code is unreleased; the choices here, and why:

* **Source**: the output of the middle of the network (``mid_block`` of a U-Net, the output of block
  ``depth / 2`` of a DiT), where diffusion features are known to be most linearly separable. It is
  *globally average-pooled* (tokens averaged for a DiT): a per-image summary, cheap, and unable to leak
  spatial detail past the bottleneck.
* **Injection**: a small MLP (Linear → SiLU → Linear, last layer zero-initialised) maps the pooled
  vector into the time-embedding space of the *later* layers and adds it there: to the input of every
  decoder resnet's ``time_emb_proj`` (a U-Net's up blocks) or to the output of every later DiT block's
  adaLN conditioning embedding (``norm1.emb``). The time/adaLN path is where these networks already take
  global conditioning, so no block needs a new input. Zero-initialising the last layer makes the
  model start exactly as the plain one.
* **Gradients are not stopped**: the point of self-conditioning is that the decoder's need for a
  compact summary shapes the mid-level features; stopping the gradient would make the MLP read fixed
  features and leave the representation as it was.

Everything is done with forward hooks on the diffusers modules; the pooled features are computed by the
forward itself, so the only extra work is one pooling and one tiny MLP per step (measured in
``experiments/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from difffeat.plugins import register_plugin

__all__ = ["SelfConditioning"]


@register_plugin("selfcond")
class SelfConditioning(nn.Module):
    """Routes pooled mid-level features through an MLP into the conditioning of later layers.

    Args:
        hidden: MLP hidden width.
        source: tap whose output is pooled (default: ``mid_block`` or the middle DiT block).
        enabled: ``False`` registers no hook at all (the plain model, exactly).
    """

    def __init__(self, hidden: int = 256, source: str | None = None, enabled: bool = True) -> None:
        super().__init__()
        self.hidden, self.source, self.enabled = hidden, source, enabled
        self.mlp: nn.Sequential | None = None
        self.targets: list[str] = []
        self.mode = ""

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module (saved beside exported weights).

        Returns:
            ``hidden``, ``source`` (the one chosen by :meth:`bind`, once bound) and ``enabled``.
        """
        return {"hidden": self.hidden, "source": self.source, "enabled": self.enabled}

    def attach(self, backbone: Any) -> SelfConditioning:
        """Binds this module to ``backbone``'s model and makes it active in every forward.

        This is the plug-in protocol of :mod:`difffeat.plugins`, used when a model folder is loaded.

        Args:
            backbone: a :class:`~difffeat.backbones.Backbone`.

        Returns:
            This module.
        """
        backbone.set_self_conditioning(self)
        return self

    def bind(self, model: nn.Module) -> SelfConditioning:
        """Chooses source and targets in ``model`` and builds the MLP (last layer zero-initialised).

        Args:
            model: a diffusers U-Net (``up_blocks``) or DiT (``transformer_blocks``).

        Returns:
            This module.

        Raises:
            TypeError: ``model`` is neither.
            ValueError: a U-Net source other than ``mid_block``, or a DiT source after which no block runs.
        """
        if hasattr(model, "transformer_blocks"):
            n = len(model.transformer_blocks)
            self.source = self.source or f"transformer_blocks.{n // 2 - 1}"
            first = int(self.source.split(".")[1]) + 1
            self.targets = [f"transformer_blocks.{i}.norm1.emb" for i in range(first, n)]
            in_dim = model.transformer_blocks[0].norm1.linear.in_features
            out_dim = in_dim
            self.mode = "output"
        elif hasattr(model, "up_blocks"):
            self.source = self.source or "mid_block"
            if self.source != "mid_block":  # every up block is a target: only the mid block runs before all
                raise ValueError(f"a U-Net's self-conditioning source is its mid_block, got {self.source!r}")
            self.targets = [f"up_blocks.{i}.resnets.{j}.time_emb_proj" for i, b in enumerate(model.up_blocks)
                            for j in range(len(b.resnets))]
            in_dim = model.mid_block.resnets[-1].out_channels
            out_dim = model.up_blocks[0].resnets[0].time_emb_proj.in_features
            self.mode = "input"
        else:
            raise TypeError(f"self-conditioning supports U-Nets and DiTs; got {type(model).__name__}")
        if not self.targets:
            raise ValueError(f"no layer runs after source {self.source!r}: nothing to condition")
        self.mlp = nn.Sequential(nn.Linear(in_dim, self.hidden), nn.SiLU(), nn.Linear(self.hidden, out_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        return self

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[None]:
        """Active self-conditioning for the forwards run inside this context (none when disabled).

        Args:
            model: the diffusers model this module was bound to.

        Yields:
            Nothing; the hooks are removed on exit, also after an error.
        """
        if not self.enabled:
            yield
            return
        state: dict[str, torch.Tensor] = {}

        def read(_m: nn.Module, _i: Any, out: Any) -> None:
            h = out[0] if isinstance(out, tuple) else out
            pooled = h.mean(1) if h.ndim == 3 else h.mean((2, 3))
            state["s"] = self.mlp(pooled)

        def add_to_output(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
            return out + state["s"].to(out.dtype)

        def add_to_input(_m: nn.Module, args: tuple) -> tuple:
            return (args[0] + state["s"].to(args[0].dtype), *args[1:])

        handles = [model.get_submodule(self.source).register_forward_hook(read)]
        for name in self.targets:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(add_to_output) if self.mode == "output"
                           else module.register_forward_pre_hook(add_to_input))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
