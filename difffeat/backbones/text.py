"""Text conditions: the base of every text-conditioned adapter, and prompts encoded by a pipeline's own encoders.

A text-conditioned denoiser takes one or more condition tensors besides the noisy latent
(``encoder_hidden_states``; SDXL adds pooled ``text_embeds``, SD3 and Flux ``pooled_projections``, PixArt
an ``encoder_attention_mask``). :class:`TextConditioned` holds them as a dict named by the denoiser's
``forward`` keywords, :attr:`TextConditioned.condition_keys`:

* **the default condition** (what an extraction without prompts sees, the unconditional branch of
  classifier-free guidance) is resolved once, at construction, in this order: a ``condition`` dict (or,
  for the SD U-Net, an ``encoder_hidden_states`` tensor) given by the caller; a ``null_embedding``
  safetensors file (given, or ``null_embedding.safetensors`` in the pipeline folder) holding those keys;
  the empty prompt ``""`` encoded by the pipeline's text encoders (:meth:`TextConditioned.empty_condition`,
  which a family may override: SDXL's pipeline uses zeros where ``force_zeros_for_empty_prompt`` is set);
  zeros of :meth:`TextConditioned.null_shapes`, with a warning. The tensors are non-persistent buffers
  (they are not weights) and are keyed in :meth:`TextConditioned.condition_spec`;
* **per-image prompts** go through :meth:`TextConditioned.encode_prompts`, which builds the family's
  prompt encoder from the pipeline folder once (:meth:`TextConditioned.load_prompt_encoder`) and returns
  the same dict with batch ``len(prompts)``;
* a call's condition (:meth:`TextConditioned.condition`) is the default overridden by whatever the
  caller passes (a dict, or a tensor meaning ``encoder_hidden_states``), batch 1 expanded to the batch.

Text encoders and tokenizers load with transformers from the pipeline's sub-folders named in
``model_index.json`` (:func:`load_text_encoder`), never from the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from difffeat.backbones.base import Backbone
from difffeat.digest import tensor_digest

__all__ = ["PROMPT_CACHE_SIZE", "PromptEncoder", "TextConditioned", "has_component", "load_text_encoder",
           "pipeline_components", "tokenize"]

log = logging.getLogger(__name__)

#: encoded prompts kept per backbone (oldest dropped first)
PROMPT_CACHE_SIZE = 4096

#: a prompt encoder: prompts in, the denoiser's condition tensors (batch ``len(prompts)``) out
PromptEncoder = Callable[[list[str]], dict[str, torch.Tensor]]


def pipeline_components(pipeline_dir: str | Path) -> dict[str, Any]:
    """A pipeline folder's ``model_index.json`` (components and pipeline options); ``{}`` where it has none."""
    index = Path(pipeline_dir) / "model_index.json"
    return json.loads(index.read_text()) if index.exists() else {}


def has_component(pipeline_dir: str | Path, components: dict[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` (``components``) names component ``name`` and its sub-folder exists."""
    entry = components.get(name)
    return isinstance(entry, list) and entry[0] is not None and (Path(pipeline_dir) / name).is_dir()


def _components(pipeline_dir: Path) -> dict[str, Any]:
    if not (pipeline_dir / "model_index.json").exists():
        raise FileNotFoundError(f"{pipeline_dir} has no model_index.json: not a diffusers pipeline folder, so it "
                                f"has no text encoders; pass a condition or a null_embedding file instead")
    return pipeline_components(pipeline_dir)


def _load_component(pipeline_dir: Path, name: str, components: dict[str, Any]) -> Any:
    import transformers

    entry = components.get(name)
    folder = pipeline_dir / name
    if not entry or entry[0] is None or not folder.is_dir():
        raise FileNotFoundError(f"{pipeline_dir} has no {name!r} component (model_index.json lists "
                                f"{sorted(k for k, v in components.items() if isinstance(v, list) and v[0])})")
    library, class_name = entry
    if library != "transformers" or not hasattr(transformers, class_name):
        raise ValueError(f"{pipeline_dir / 'model_index.json'}: component {name!r} is {library}.{class_name}; "
                         f"difffeat loads text encoders and tokenizers from transformers only")
    return getattr(transformers, class_name).from_pretrained(folder, local_files_only=True)


def load_text_encoder(pipeline_dir: str | Path, encoder: str = "text_encoder",
                      tokenizer: str = "tokenizer") -> tuple[nn.Module, Any]:
    """A pipeline's text encoder and its tokenizer, loaded with the transformers classes ``model_index.json`` names.

    Args:
        pipeline_dir: a diffusers pipeline folder.
        encoder: the encoder's component name (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``).
        tokenizer: the matching tokenizer's component name.

    Returns:
        ``(encoder in eval mode without gradients, tokenizer)``.

    Raises:
        FileNotFoundError: the folder is not a pipeline, or lacks the encoder or its tokenizer (named).
        ValueError: a component that is not a transformers class.
    """
    pipeline_dir = Path(pipeline_dir)
    components = _components(pipeline_dir)
    if encoder in components and (pipeline_dir / encoder).is_dir() and not (pipeline_dir / tokenizer).is_dir():
        raise FileNotFoundError(f"{pipeline_dir} has a text encoder {encoder!r} but no tokenizer {tokenizer!r}: "
                                f"a prompt cannot be encoded without it; copy the pipeline's {tokenizer}/ folder")
    model = _load_component(pipeline_dir, encoder, components)
    return model.eval().requires_grad_(False), _load_component(pipeline_dir, tokenizer, components)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to ``max_length`` and truncated, as every diffusers pipeline does.

    Args:
        tokenizer: a transformers tokenizer.
        prompts: the prompts.
        max_length: padding length; default the tokenizer's ``model_max_length`` (77 for CLIP).
    """
    length = max_length if max_length is not None else tokenizer.model_max_length
    out = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt")
    return {"input_ids": out.input_ids, "attention_mask": out.attention_mask}


def _expand(t: torch.Tensor, batch: int, key: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"condition {key!r} has batch {t.shape[0]}, the latents {batch}; give 1 or {batch} rows")


class TextConditioned(Backbone):
    """A denoiser conditioned on text: the default condition, per-image prompts and per-call overrides.

    Subclasses set :attr:`condition_keys` and implement :meth:`null_shapes` and
    :meth:`load_prompt_encoder` (the family's encoding, exactly as its diffusers pipeline does it).

    Args:
        model: the diffusers denoiser.
        schedule: its noise schedule.
        condition: the default condition, ``{key: (1 or B, ...)}`` for some or all :attr:`condition_keys`.
        null_embedding: a safetensors file holding the default condition under those keys (the key
            ``prompt_embeds`` is read as ``encoder_hidden_states``).
        **kwargs: see :class:`~difffeat.backbones.base.Backbone`; its ``pipeline_dir`` is searched for
            ``null_embedding.safetensors`` and for the text encoders.
    """

    #: the denoiser's ``forward`` keywords the condition dict holds
    condition_keys: tuple[str, ...] = ("encoder_hidden_states",)

    def __init__(self, model: nn.Module, schedule: Any, condition: dict[str, torch.Tensor] | None = None,
                 null_embedding: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(model, schedule, **kwargs)
        self._prompt_encoder: PromptEncoder | None = None
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        default = self._resolve_default(dict(condition or {}), null_embedding)
        for key in self.condition_keys:
            value = default[key]
            self.check_condition(key, value)
            self.register_buffer(key, value if not value.is_floating_point() else value.float(), persistent=False)

    # ----------------------------------------------------------------- what families provide
    def null_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes (batch 1) of the all-zeros fallback condition, one per key."""
        raise NotImplementedError

    def load_prompt_encoder(self) -> PromptEncoder:
        """Builds the family's prompt encoder from :attr:`pipeline_dir` (see :func:`load_text_encoder`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode prompts")

    def empty_condition(self) -> dict[str, torch.Tensor]:
        """The unconditional condition of a pipeline folder with text encoders: the empty prompt, encoded."""
        return self.encode_prompts([""])

    def check_condition(self, key: str, value: torch.Tensor) -> None:
        """Raises ``ValueError`` for a condition tensor of the wrong shape (default: against :meth:`null_shapes`)."""
        expected = self.null_shapes()[key]
        if value.ndim != len(expected) or (len(expected) > 1 and value.shape[-1] != expected[-1]):
            raise ValueError(f"condition {key!r} must have shape (B, {', '.join(map(str, expected[1:]))}) "
                             f"(any length where the text length varies), got {tuple(value.shape)}")

    # ----------------------------------------------------------------- shared machinery
    def _resolve_default(self, given: dict[str, torch.Tensor], null_embedding: str | Path | None
                         ) -> dict[str, torch.Tensor]:
        unknown = sorted(set(given) - set(self.condition_keys))
        if unknown:
            raise KeyError(f"unknown condition key(s) {unknown} for {self.name}; expected {list(self.condition_keys)}")
        if len(given) < len(self.condition_keys):
            path = Path(null_embedding) if null_embedding is not None else None
            if path is None and self.pipeline_dir is not None:
                candidate = self.pipeline_dir / "null_embedding.safetensors"
                path = candidate if candidate.exists() else None
            if path is not None:
                given = {**self._read_null_embedding(path), **given}
            elif self.pipeline_dir is not None and self._has_text_encoder():
                given = {**{k: v.detach().cpu() for k, v in self.empty_condition().items()}, **given}
        missing = [k for k in self.condition_keys if k not in given]
        if missing:
            log.warning("no condition, null_embedding or text encoder for %s: conditioning %s on zeros",
                        self.name, missing)
            given.update({k: torch.zeros(self.null_shapes()[k]) for k in missing})
        return given

    def _has_text_encoder(self) -> bool:
        components = pipeline_components(self.pipeline_dir)
        return any(k.startswith("text_encoder") and isinstance(v, list) and v[0] for k, v in components.items())

    def _read_null_embedding(self, path: Path) -> dict[str, torch.Tensor]:
        tensors = load_file(str(path))
        if "prompt_embeds" in tensors and "encoder_hidden_states" not in tensors:
            tensors["encoder_hidden_states"] = tensors.pop("prompt_embeds")
        found = {k: v for k, v in tensors.items() if k in self.condition_keys}
        if not found:
            raise KeyError(f"{path} holds none of the condition keys {list(self.condition_keys)} "
                           f"(or 'prompt_embeds'); found {sorted(tensors)}")
        return found

    @property
    def default_condition(self) -> dict[str, torch.Tensor]:
        """The condition used when a call passes none (batch 1 or the fixed batch given)."""
        return {key: getattr(self, key) for key in self.condition_keys}

    def condition(self, cond: Any, batch: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The condition of one call: the default, overridden by ``cond``, expanded to ``batch``.

        Args:
            cond: ``None``; a dict with some of :attr:`condition_keys`; or a tensor, read as
                ``encoder_hidden_states``.
            batch: the latents' batch.
            dtype: floating-point condition tensors are cast to it (the model's dtype).
            device: where the tensors go (the latents' device).

        Raises:
            KeyError: an unknown key in ``cond``.
            ValueError: a tensor whose batch is neither 1 nor ``batch``.
        """
        if isinstance(cond, torch.Tensor):
            cond = {"encoder_hidden_states": cond}
        cond = dict(cond or {})
        unknown = sorted(set(cond) - set(self.condition_keys))
        if unknown:
            raise KeyError(f"unknown condition key(s) {unknown} for {self.name}; expected {list(self.condition_keys)}")
        out = {}
        for key in self.condition_keys:
            value = cond.get(key, getattr(self, key))
            value = _expand(value.to(device) if device is not None else value, batch, key)
            out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        return out

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-image prompts through the pipeline's text encoders, as its diffusers pipeline encodes them.

        The encoders are loaded from :attr:`pipeline_dir` on the first call and kept. Each distinct prompt
        is encoded alone (so its condition does not depend on the prompts beside it) and cached
        (:data:`PROMPT_CACHE_SIZE` prompts).

        Returns:
            The condition dict with batch ``len(prompts)``.

        Raises:
            FileNotFoundError: no pipeline folder, or one without a text encoder or tokenizer (named).
            TypeError: ``prompts`` is a single string.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image, not a single string")
        if self._prompt_encoder is None:
            if self.pipeline_dir is None:
                raise FileNotFoundError(f"{self.name} was not loaded from a pipeline folder, so it has no text "
                                        f"encoder: pass condition tensors instead of prompts")
            self._prompt_encoder = self.load_prompt_encoder()
        # one prompt per encoder call: a text encoder's output, like a denoiser's, rounds differently with the
        # batch on the CPU (measured 4.8e-7 on CLIP's pooled projection), and a prompt's condition must not
        # depend on the prompts beside it; repeated prompts ("a photo of a {class}") are encoded once
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._prompt_cache:
                if len(self._prompt_cache) >= PROMPT_CACHE_SIZE:
                    self._prompt_cache.pop(next(iter(self._prompt_cache)))
                self._prompt_cache[prompt] = self._prompt_encoder([prompt])
        if not prompts:
            raise ValueError("give at least one prompt")
        first = self._prompt_cache[prompts[0]]
        return {key: torch.cat([self._prompt_cache[p][key] for p in prompts]) for key in first}

    def condition_spec(self) -> dict[str, Any]:
        """Digests of the default condition tensors (non-persistent buffers, so outside the weights digest)."""
        return {key: tensor_digest(getattr(self, key)) for key in self.condition_keys}
