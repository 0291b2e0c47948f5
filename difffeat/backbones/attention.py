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
    followed by the bank's, so every query token attends to query and support tokens. It works through
    forward hooks on the attentions' ``to_k`` / ``to_v`` projections; no attention processor or forward
    is replaced.

    Both passes check that every projection's hook fired: an attention processor that does not call
    ``to_k`` / ``to_v`` (a fused-QKV processor after ``fuse_qkv_projections()``, or a custom one) would
    otherwise run plain self-attention, the query never seeing the support, without any sign. The bank
    holds one support pass for one query pass: it is emptied when a read ends and whenever a pass ends
    in an exception, so an aborted pass never leaks into the next episode.

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

    def _keys(self) -> list[str]:
        return [f"{name}.{proj}" for name in self.attns for proj in ("to_k", "to_v")]

    def _skipped(self, fired: set[str] | dict[str, Any], pass_name: str) -> RuntimeError | None:
        """The error naming the attentions whose projections did not fire in a pass, or ``None``."""
        names = sorted({key.rsplit(".", 1)[0] for key in self._keys() if key not in fired})
        if not names:
            return None
        effect = ("their K/V banks are empty" if pass_name == "support pass"
                  else "their keys and values were not extended with the bank's")
        return RuntimeError(
            f"KV fusion: the {pass_name} did not call to_k / to_v of {len(names)} self-attention(s), so {effect} "
            f"and the query would not see the support: {', '.join(names)}. Their attention "
            f"processor computes keys and values another way (a fused-QKV processor after fuse_qkv_projections(), "
            f"or a custom processor); use one that calls to_k and to_v (e.g. diffusers' AttnProcessor2_0).")

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

        Any earlier bank is dropped first; the bank is emptied again if the pass raises.

        Args:
            shots: supports per episode.

        Raises:
            ValueError: ``shots < 1``, or a support batch that is not a multiple of ``shots``.
            RuntimeError: the pass did not call some attention's ``to_k`` / ``to_v`` (named).
        """
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")

        def hook_for(key: str):
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
                if out.shape[0] % shots:
                    raise ValueError(f"support batch {out.shape[0]} is not a multiple of shots={shots}")
                self.bank[key] = out.reshape(out.shape[0] // shots, shots * out.shape[1], out.shape[2])

            return hook

        self.bank.clear()
        try:
            with self._hooks(hook_for):
                yield
            error = self._skipped(self.bank, "support pass")
            if error:
                raise error
        except BaseException:  # KeyboardInterrupt included: a half-written bank must not reach a query
            self.bank.clear()
            raise

    @contextmanager
    def read(self) -> Iterator[None]:
        """Query pass: self-attention keys/values extended with the bank's; the bank is emptied after.

        Raises:
            RuntimeError: no support pass filled the bank, or the query pass did not call some
                attention's ``to_k`` / ``to_v`` (named).
            ValueError: the query batch differs from the number of episodes in the bank.
        """
        fired: set[str] = set()

        def hook_for(key: str):
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
                stored = self.bank[key]
                if stored.shape[0] != out.shape[0]:
                    raise ValueError(f"query batch {out.shape[0]} does not match the {stored.shape[0]} episodes "
                                     f"in the bank")
                fired.add(key)
                return torch.cat([out, stored.to(out.dtype)], 1)

            return hook

        try:
            if not self.bank:
                raise RuntimeError("KV fusion: no support pass filled the K/V bank; run the support images under "
                                   "write() before the query under read() (plain self-attention needs neither)")
            with self._hooks(hook_for):
                yield
            error = self._skipped(fired, "query pass")
            if error:
                raise error
        finally:
            self.bank.clear()
