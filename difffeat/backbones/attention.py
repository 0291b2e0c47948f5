"""Model surgery on diffusers denoisers that is not tied to one task.

* :func:`support_conv_in` / :class:`DualConvIn`: a second input convolution that takes an image with
  extra (mask) channels, beside the original one, so one diffusers forward serves both inputs.
* :class:`KVFusion`: keys and values of one pass (the support) appended to those of the next pass
  (the query) in every self-attention, through forward hooks on the attention projections.
* :class:`AttentionTaps`: the queries, keys, values and attention probabilities of attention modules as
  feature taps (``…attn2.q``, ``.k``, ``.v``, ``.map``, ``.map_heads``), read by forward hooks on the
  projections; :class:`~difffeat.backbones.Backbone` offers them for every adapter.

Nothing here replaces a diffusers ``forward`` or attention processor (see the design's contracts).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "ATTENTION_PARTS",
    "MAP_MEMORY_LIMIT",
    "AttentionTaps",
    "DualConvIn",
    "KVFusion",
    "attention_map",
    "attention_modules",
    "is_attention",
    "split_attention_tap",
    "support_conv_in",
]


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


# --------------------------------------------------------------------------- attention internals as taps
#: the parts of an attention module offered as taps, ``<attention path>.<part>``: the ``to_q`` / ``to_k`` /
#: ``to_v`` projections (tokens ``(B, N, D)``), the head-mean attention probabilities ``map``
#: ``(B, Nq, Nk)`` and the per-head ones ``map_heads`` ``(B, heads, Nq, Nk)``
ATTENTION_PARTS = ("q", "k", "v", "map", "map_heads")

#: the largest attention map, in bytes of float32, that a ``map`` / ``map_heads`` tap may allocate per
#: forward; read when the map is computed, so ``difffeat.backbones.attention.MAP_MEMORY_LIMIT = ...``
#: raises (or lowers) it. 2 GiB: SD-1.5's first attention at 512 px (4096 tokens, 8 heads) is 512 MiB per
#: image for ``map_heads``, 64 MiB for ``map``; at 1024 px it is 8 GiB per image for ``map_heads``.
MAP_MEMORY_LIMIT = 2 * 1024**3

#: keyword arguments of an attention module's forward whose value (when not ``None``) is a rotary position
#: embedding its processor applies to queries and keys (Flux, HunyuanDiT, Lumina, CogVideoX, Wan)
ROTARY_KWARGS = ("image_rotary_emb", "rotary_emb", "freqs_cis")

#: projections whose outputs are the key sequence of the map, in this order, each with its key norm
_KEY_PROJECTIONS = (("to_k", "norm_k"), ("add_k_proj", "norm_added_k"))
#: projections whose outputs are the value sequence, in the keys' order
_VALUE_PROJECTIONS = ("to_v", "add_v_proj")


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers attention module with separate ``to_q`` and ``to_k`` projections.

    diffusers' ``Attention`` (U-Nets, DiT, PixArt, SD3) and the newer per-model classes built on
    ``AttentionModuleMixin`` (``FluxAttention``); modules after ``fuse_qkv_projections()`` still have
    ``to_q`` / ``to_k`` but their processor no longer calls them (their taps then fail, naming the module).
    """
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return (isinstance(module, Attention | AttentionModuleMixin) and hasattr(module, "heads")
            and isinstance(getattr(module, "to_q", None), nn.Linear)
            and isinstance(getattr(module, "to_k", None), nn.Linear))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module of ``model`` (:func:`is_attention`) by module path, in registration order."""
    return {name: m for name, m in model.named_modules() if name and is_attention(m)}


def split_attention_tap(name: str, attentions: Iterable[str]) -> tuple[str, str] | None:
    """``(attention path, part)`` of an attention tap name (``"….attn2.map"`` → ``("….attn2", "map")``), or ``None``."""
    path, _, part = name.rpartition(".")
    return (path, part) if part in ATTENTION_PARTS and path in attentions else None


def _norm_width(norm: nn.Module) -> int | None:
    """The feature width a norm module was built for (``None`` for width-free norms such as an Lp norm)."""
    shape = getattr(norm, "normalized_shape", None)
    if shape is None:
        shape = getattr(norm, "dim", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, tuple | list | torch.Size) and len(shape):
        return int(shape[-1])
    return None


def _split_heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """Projection tokens ``(B, N, W)`` as float32 heads ``(B, W // head_dim, N, head_dim)``, normed as processors do.

    A norm built for one head's width (``qk_norm="layer_norm"`` / ``"rms_norm"``: SD3, Flux, PixArt-Sigma
    variants) is applied per head after the split, as ``AttnProcessor2_0`` and ``JointAttnProcessor2_0``
    do; one built for the whole projection width (``"layer_norm_across_heads"``) before it.
    """
    b, n, w = x.shape
    across = norm is not None and w != head_dim and _norm_width(norm) == w
    if across:
        x = norm(x)
    x = x.reshape(b, n, w // head_dim, head_dim).transpose(1, 2)
    if norm is not None and not across:
        x = norm(x)
    return x.float()


def _mask_bias(attn: nn.Module, mask: torch.Tensor, batch: int, heads: int, nk: int) -> torch.Tensor:
    """An attention mask as the additive float bias ``(B, heads or 1, Nq or 1, Nk)`` the processor applies."""
    if mask.dtype == torch.bool:  # SDPA's boolean convention: True attends
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.ndim <= 3 and callable(getattr(attn, "prepare_attention_mask", None)):
        mask = attn.prepare_attention_mask(mask, nk, batch)  # (B·heads, Nq or 1, Nk), as the processors call it
        mask = mask.reshape(batch, heads, -1, mask.shape[-1])
    if mask.shape[-1] != nk:
        raise ValueError(f"an attention mask over {mask.shape[-1]} keys for an attention over {nk} keys")
    return mask.float()


def attention_map(attn: nn.Module, query: torch.Tensor, keys: list[tuple[torch.Tensor, nn.Module | None]],
                  attention_mask: torch.Tensor | None = None, mean_heads: bool = True, name: str = "attention map",
                  limit: int | None = None) -> torch.Tensor:
    """Attention probabilities ``softmax(q kᵀ · attn.scale + mask)`` per head, from projection outputs.

    Computed in float32 whatever the model's dtype (diffusers' ``upcast_softmax`` path), so rows sum to
    1 to float32 rounding. ``attn.scale`` is what diffusers' ``AttnProcessor`` multiplies by; the SDPA
    processors use ``1/√head_dim``, the same number unless a module was built with ``scale_qk=False``.

    Memory: the result takes ``4·B·Nq·Nk`` bytes (``mean_heads``, computed one head at a time, peak about
    three times that) or ``4·B·heads·Nq·Nk`` bytes (all heads, peak about twice that). It is refused
    before anything is allocated when the result exceeds ``limit``.

    Args:
        attn: the attention module (its ``heads``, ``scale``, ``norm_q``, ``prepare_attention_mask``).
        query: ``to_q``'s output ``(B, Nq, heads·head_dim)``.
        keys: key projections' outputs ``(B, Nk_i, kv_heads·head_dim)`` with the norm each gets (``norm_k``,
            ``norm_added_k`` or ``None``); their tokens are concatenated in this order.
        attention_mask: the mask the module's forward received, if any (boolean or additive).
        mean_heads: average the probabilities over heads: ``(B, Nq, Nk)``; else ``(B, heads, Nq, Nk)``.
        name: how the map is named in errors (the tap name).
        limit: the byte limit; default :data:`MAP_MEMORY_LIMIT`.

    Returns:
        float32 probabilities, each row summing to 1 over the ``Nk`` keys.

    Raises:
        MemoryError: the map would exceed ``limit`` (naming the tap, its shape and its size).
    """
    heads = int(attn.heads)
    b, nq, width = query.shape
    head_dim = width // heads
    nk = sum(k.shape[1] for k, _ in keys)
    shape = (b, nq, nk) if mean_heads else (b, heads, nq, nk)
    size = 4 * math.prod(shape)
    limit = MAP_MEMORY_LIMIT if limit is None else limit
    if size > limit:
        raise MemoryError(
            f"attention tap {name!r}: a float32 map of shape {shape} takes {size:,} bytes ({size / 2**20:.1f} MiB), "
            f"over the limit of {limit:,} bytes (difffeat.backbones.attention.MAP_MEMORY_LIMIT). Lower the batch "
            f"size or the resolution, tap '.map' (head mean) instead of '.map_heads', or raise the limit")
    q = _split_heads(query, head_dim, getattr(attn, "norm_q", None))
    k = torch.cat([_split_heads(key, head_dim, norm) for key, norm in keys], dim=2)
    if k.shape[1] != heads:  # grouped-query attention: each key head serves heads // kv_heads query heads
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    bias = None if attention_mask is None else _mask_bias(attn, attention_mask, b, heads, nk)
    scale = float(getattr(attn, "scale", head_dim**-0.5))
    if not mean_heads:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        return (scores if bias is None else scores + bias).softmax(-1)
    out = torch.zeros(shape, device=q.device)
    for h in range(heads):
        scores = torch.matmul(q[:, h], k[:, h].transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias[:, h if bias.shape[1] == heads else 0]
        out += scores.softmax(-1)
    return out / heads


class AttentionTaps:
    """Queries, keys, values and attention maps of diffusers attention modules, read by forward hooks.

    Tap names are ``<attention path>.<part>`` (:data:`ATTENTION_PARTS`):

    * ``q``, ``k``, ``v``: the outputs of ``to_q``, ``to_k``, ``to_v``, tokens ``(B, N, heads·head_dim)``
      before any ``norm_q`` / ``norm_k`` (what the projections give). For a cross-attention (``attn2``)
      ``k`` and ``v`` are text tokens; for a joint text-image attention (SD3) they are the image stream's.
    * ``map``: attention probabilities averaged over heads ``(B, Nq, Nk)``; ``map_heads``: all heads
      ``(B, heads, Nq, Nk)``. Rows are the queries of ``to_q`` (image tokens), columns every key the
      processor attends to: ``to_k``'s tokens, followed by ``add_k_proj``'s where the module has one and
      the processor calls it. For SD3's joint attention that is the image queries over the concatenation
      [image; text] of keys, the rows of the processor's joint softmax (which also has text-query rows,
      not tapped); the processor's own concatenation order may differ (the values are the same, the
      columns permuted). Maps are recomputed from the hooked projections with ``norm_q`` / ``norm_k`` /
      ``norm_added_k`` applied per head as the processors apply them, and with the attention mask the
      module received (:func:`attention_map`); the processor itself is left alone, so a map is exactly
      what the processor attends with only for processors that attend with plain softmax attention over
      these projections (every diffusers processor of ``Attention`` that calls ``to_q`` / ``to_k``).
    * Rotary embeddings: a module whose forward receives one (:data:`ROTARY_KWARGS`, Flux's
      ``image_rotary_emb``) rotates queries and keys inside its processor, which projections alone do
      not show; its ``map`` / ``map_heads`` are refused with an error rather than returned without the
      rotation (its ``q`` / ``k`` / ``v`` taps remain).

    A map is recorded when its module's forward returns, a projection when the projection returns, so
    the stop signal of early exit can come from any of them. Hooks exist only inside :meth:`hooks`.

    Args:
        attentions: attention modules by path (:func:`attention_modules`).
        names: the attention taps to record.
        record: called with ``(tap name, tensor)`` as each tap is read (it may raise to stop the forward).
        probe: record shapes only: maps are ``meta`` tensors (nothing of size ``Nq·Nk`` is allocated), and
            modules receiving rotary embeddings are collected in :attr:`rotary` instead of raising.
    """

    def __init__(self, attentions: dict[str, nn.Module], names: Iterable[str],
                 record: Callable[[str, torch.Tensor], None], probe: bool = False) -> None:
        self.attentions, self.record, self.probe = attentions, record, probe
        self.wanted: dict[str, set[str]] = {}
        for name in names:
            split = split_attention_tap(name, attentions)
            if split is None:
                raise KeyError(f"{name!r} is not an attention tap (<attention module>.{{{','.join(ATTENTION_PARTS)}}})")
            self.wanted.setdefault(split[0], set()).add(split[1])
        #: paths of the modules whose forward received rotary embeddings (filled in ``probe`` mode)
        self.rotary: set[str] = set()

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Hooks on the wanted modules' projections and forwards, removed on exit (also after an error)."""
        handles: list[Any] = []
        try:
            for path, parts in self.wanted.items():
                handles += self._register(path, self.attentions[path], parts)
            yield
        finally:
            for h in handles:
                h.remove()

    def _register(self, path: str, attn: nn.Module, parts: set[str]) -> list[Any]:
        maps = [p for p in ("map", "map_heads") if p in parts]
        state: dict[str, Any] = {}
        signature = inspect.signature(attn.forward)
        projections = {f"to_{p}": p for p in ("q", "k", "v") if p in parts}
        if maps:
            projections.setdefault("to_q", None)
            for proj, _norm in _KEY_PROJECTIONS:
                projections.setdefault(proj, None)
        projections = {p: part for p, part in projections.items() if isinstance(getattr(attn, p, None), nn.Module)}

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            state.clear()
            if maps and any(kwargs.get(k) is not None for k in ROTARY_KWARGS):
                if self.probe:
                    self.rotary.add(path)
                else:
                    raise ValueError(rotary_refusal(path))
            if maps and not self.probe:
                try:
                    state["mask"] = signature.bind(*args, **kwargs).arguments.get("attention_mask")
                except TypeError:
                    state["mask"] = kwargs.get("attention_mask")

        def projection_hook(proj: str, part: str | None):
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
                state[proj] = out
                if part is not None:
                    self.record(f"{path}.{part}", out)

            return hook

        def post_hook(_m: nn.Module, _i: Any, _out: Any) -> None:
            if self.probe:
                if maps and "to_q" in state and "to_k" in state:
                    heads, (b, nq, _), nk = int(attn.heads), state["to_q"].shape, sum(
                        state[p].shape[1] for p, _n in _KEY_PROJECTIONS if p in state)
                    for part in maps:
                        shape = (b, nq, nk) if part == "map" else (b, heads, nq, nk)
                        self.record(f"{path}.{part}", torch.empty(shape, device="meta"))
                state.clear()
                return
            missing = [proj for proj in projections if proj not in state and proj != "add_k_proj"]
            if missing:
                state.clear()
                raise RuntimeError(
                    f"attention taps of {path}: its processor ({type(getattr(attn, 'processor', None)).__name__}) "
                    f"did not call {', '.join(missing)}, so they cannot be read (a fused-QKV processor after "
                    f"fuse_qkv_projections(), or a custom one); use a processor that calls to_q / to_k / to_v "
                    f"(e.g. diffusers' AttnProcessor2_0)")
            if maps:
                keys = [(state[p], getattr(attn, norm, None)) for p, norm in _KEY_PROJECTIONS if p in state]
                query, mask = state["to_q"], state.get("mask")
                state.clear()
                for part in maps:
                    name = f"{path}.{part}"
                    self.record(name, attention_map(attn, query, keys, mask, mean_heads=part == "map", name=name))
            state.clear()

        handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True)]
        handles += [getattr(attn, proj).register_forward_hook(projection_hook(proj, part))
                    for proj, part in projections.items()]
        handles.append(attn.register_forward_hook(post_hook))
        return handles


def rotary_refusal(path: str) -> str:
    """Why the maps of attention module ``path`` are not offered: its processor applies rotary embeddings."""
    return (f"attention taps {path}.map / {path}.map_heads are not offered: this module receives rotary position "
            f"embeddings ({' / '.join(ROTARY_KWARGS)}) that its processor applies to queries and keys, so a map "
            f"from the projections would not be the one it attends with; its {path}.q / .k / .v taps remain")
