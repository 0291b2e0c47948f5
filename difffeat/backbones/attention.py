"""Model surgery on diffusers denoisers that is not tied to one task.

* :func:`support_conv_in` / :class:`DualConvIn`: a second input convolution that takes an image with
  extra (mask) channels, beside the original one, so one diffusers forward serves both inputs.
* :class:`KVFusion`: keys and values of one pass (the support) appended to those of the next pass
  (the query) in every self-attention, through forward hooks on the attention projections.

Nothing here replaces a diffusers ``forward`` or attention processor (see the design's contracts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["DualConvIn", "KVFusion", "support_conv_in"]


def support_conv_in(conv: nn.Conv2d) -> nn.Conv2d:
    """A twin of ``conv`` for an image concatenated with as many mask channels.

    The new convolution takes ``2 · in_channels`` inputs. Its weights are the original ones repeated
    along the input channels and halved, so it reproduces ``conv`` when the mask channels carry the same
    values as the image channels (DiffewS's initialisation of its support input convolution).

    Args:
        conv: the original input convolution; it is left unchanged.

    Returns:
        The new convolution, on ``conv``'s device and dtype.
    """
    new = nn.Conv2d(2 * conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(torch.cat([conv.weight, conv.weight], 1) / 2)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new.to(conv.weight)


class DualConvIn(nn.Module):
    """An input convolution for plain images and its :func:`support_conv_in` twin for image + mask.

    The path is chosen by the input's channel count, so the diffusers forward that calls ``conv_in``
    runs unchanged for both kinds of input.

    Args:
        conv: the model's input convolution (kept as ``query``; the twin is ``support``).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.query, self.support = conv, support_conv_in(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``support(x)`` when ``x`` has the twin's channel count, else ``query(x)``."""
        return self.support(x) if x.shape[1] == self.support.in_channels else self.query(x)


class KVFusion:
    """KV fusion (DiffewS) on every self-attention (``attn1``) of a diffusers U-Net or transformer.

    In :meth:`write` mode (the support pass) the keys and values of each self-attention are stored,
    reshaped from batch to tokens (the ``k`` shots of an episode become one ``k · N`` token sequence).
    In :meth:`read` mode (the query pass) each self-attention's keys and values are the query's own
    followed by the bank's, so every query token attends to query and support tokens. The bank is
    cleared when the read context ends (one episode batch). It works through forward hooks on the
    attentions' ``to_k`` / ``to_v`` projections; no attention processor or forward is replaced.

    Args:
        model: the diffusers denoiser.

    Raises:
        TypeError: the model has no ``attn1`` module.
    """

    def __init__(self, model: nn.Module) -> None:
        self.attns = {name: m for name, m in model.named_modules() if name.endswith("attn1")}
        if not self.attns:
            raise TypeError(f"{type(model).__name__} has no self-attention (attn1) to fuse")
        self.bank: dict[str, torch.Tensor] = {}

    @contextmanager
    def _hooks(self, hook_for: Callable[[str], Callable[..., Any]]) -> Iterator[None]:
        handles = [getattr(attn, proj).register_forward_hook(hook_for(f"{name}.{proj}"))
                   for name, attn in self.attns.items() for proj in ("to_k", "to_v")]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def write(self, shots: int) -> Iterator[None]:
        """Support pass: a batch of ``episodes × shots`` images, shots of an episode consecutive.

        Args:
            shots: supports per episode.

        Raises:
            ValueError: ``shots < 1``, or a support batch that is not a multiple of ``shots``.
        """
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")

        def hook_for(key: str):
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
                if out.shape[0] % shots:
                    raise ValueError(f"support batch {out.shape[0]} is not a multiple of shots={shots}")
                self.bank[key] = out.reshape(out.shape[0] // shots, shots * out.shape[1], out.shape[2])

            return hook

        with self._hooks(hook_for):
            yield

    @contextmanager
    def read(self) -> Iterator[None]:
        """Query pass: self-attention keys/values extended with the bank's; the bank is cleared after.

        Raises:
            ValueError: the query batch differs from the number of episodes in the bank.
        """

        def hook_for(key: str):
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
                if key not in self.bank:
                    return out
                stored = self.bank[key]
                if stored.shape[0] != out.shape[0]:
                    raise ValueError(f"query batch {out.shape[0]} does not match the {stored.shape[0]} episodes "
                                     f"in the bank")
                return torch.cat([out, stored.to(out.dtype)], 1)

            return hook

        try:
            with self._hooks(hook_for):
                yield
        finally:
            self.bank.clear()
