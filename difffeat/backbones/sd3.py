"""Adapter for diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5, MMDiT).

SD3's transformer runs two token streams side by side: the image patches and the text tokens, joined in
every block's attention ("joint attention") and carried on separately otherwise. Its conditions are
``encoder_hidden_states``, the text tokens (two CLIPs' penultimate hidden states, zero-padded to T5's width,
followed along the sequence by T5's last hidden state) and ``pooled_projections`` (both CLIPs' pooled,
projected outputs, concatenated). Prompts are encoded exactly as ``StableDiffusion3Pipeline.encode_prompt``
does with ``clip_skip=None`` (:func:`encode_sd3_prompts`).

This module also holds :class:`TextStreamTaps`, the tap machinery of joint text-image blocks shared with the
Flux adapter: a block's image stream is tapped under the block's own name, its text stream under
``<block>.text``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.backbones.base import FeatureInfo, _StopForward
from difffeat.backbones.registry import register_adapter
from difffeat.backbones.text import (
    PromptEncoder,
    TextConditioned,
    has_component,
    load_text_encoder,
    pipeline_components,
    tokenize,
)

__all__ = ["TEXT_STREAM", "SD3Backbone", "TextStreamTaps", "encode_sd3_prompts",
           "sd3_config"]

#: the suffix naming a joint block's text stream as a tap (``transformer_blocks.3.text``)
TEXT_STREAM = ".text"

#: tokens per prompt of a CLIP tokenizer when the pipeline folder gives none (CLIP's ``model_max_length``)
CLIP_TOKENS = 77



class TextStreamTaps:
    """Taps for transformers whose blocks return ``(text tokens, image tokens)`` (SD3's and Flux's joint blocks).

    A joint block ``<block>`` offers two taps: ``<block>`` reads the image stream (element 1 of the output,
    :attr:`output_streams`), ``<block>.text`` the text stream (element 0). The text tap is a *virtual* name:
    it is the same module's other output element, so it has no module path of its own. The base machinery
    resolves taps by module path, so this mixin, placed before the :class:`~difffeat.backbones.base.Backbone`
    subclass in the bases, overrides four methods and leaves every other tap (attention internals included)
    to the base:

    * :meth:`_probe_feature_info` runs the base probe with extra hooks on the joint blocks recording their
      text streams, and adds a ``<block>.text`` entry (kind ``"tokens"``, the text width, no grid) right after
      its block in execution order;
    * :meth:`modules_by_name` maps ``<block>.text`` to the block's module and refuses, naming the tap, a text
      tap of a module with no text output (SD3's last block, ``context_pre_only``, returns ``None`` text);
    * :meth:`tap` hooks text taps itself; with any requested, it runs the base hooks without their early stop
      and stops the forward once every requested tap is recorded, from a hook registered after all recording
      hooks on every tapped module (so the stop comes right after the deepest tap, as in the base);
    * :meth:`read_output` reads element 0 for a text tap.

    Attributes:
        joint_blocks: the ``nn.ModuleList`` attributes of the model whose blocks return both streams.
    """

    joint_blocks: tuple[str, ...] = ("transformer_blocks",)

    # ----------------------------------------------------------------- names
    def _joint_block_names(self) -> list[str]:
        return [f"{group}.{i}" for group in self.joint_blocks for i in range(len(getattr(self.model, group, ())))]

    def _text_block(self, name: str) -> str | None:
        """The block a text-tap name reads (``transformer_blocks.3`` for ``transformer_blocks.3.text``), else None."""
        if not name.endswith(TEXT_STREAM):
            return None
        return name[: -len(TEXT_STREAM)]

    def _text_refusal(self, name: str) -> str | None:
        """Why ``name`` (a ``.text`` name not offered) names no text stream, or None where it is no such name."""
        block = self._text_block(name)
        if block is None or name in self.feature_info:
            return None
        if block in self._joint_block_names():
            return (f"tap {name!r}: block {block} returns no text stream (context_pre_only: the last joint block "
                    f"updates only the image tokens); read its image stream as {block!r}, or the text stream of "
                    f"an earlier block")
        if block in self.feature_info:
            offered = [n for n in self.feature_info if n.endswith(TEXT_STREAM)]
            return (f"tap {name!r}: {block} returns only image tokens, it has no text stream; text streams are "
                    f"offered for the joint blocks: {offered}")
        return None

    # ----------------------------------------------------------------- probe
    @torch.no_grad()
    def _probe_feature_info(self) -> dict[str, FeatureInfo]:
        text: dict[str, torch.Tensor | None] = {}

        def make_hook(block: str):
            def hook(_m: nn.Module, _i: Any, output: Any) -> None:
                text[block] = self._text_of(block, output, strict=False)

            return hook

        blocks = self._joint_block_names()
        handles = [self.model.get_submodule(b).register_forward_hook(make_hook(b)) for b in blocks]
        try:
            info = super()._probe_feature_info()
        finally:
            for h in handles:
                h.remove()
        rows = [((i.order, 0), i) for i in info.values()]
        for block in blocks:
            out = text.get(block)
            if out is None or block not in info:
                continue
            name = f"{block}{TEXT_STREAM}"
            rows.append(((info[block].order, 1), FeatureInfo(name, int(out.shape[-1]), None, None, "tokens", 0)))
        rows.sort(key=lambda r: r[0])
        return {i.name: FeatureInfo(i.name, i.channels, i.stride, i.grid, i.kind, rank)
                for rank, (_key, i) in enumerate(rows)}

    # ----------------------------------------------------------------- resolution and hooks
    def modules_by_name(self, names: Sequence[str]) -> dict[str, nn.Module]:
        """The modules whose hooks read ``names``; ``<block>.text`` is read from ``<block>`` itself.

        Raises:
            ValueError: a text tap of a module without a text stream, naming the tap.
            KeyError: an unknown name, listing the valid ones (from the base).
        """
        for name in names:
            refusal = self._text_refusal(name)
            if refusal is not None:
                raise ValueError(refusal)
        texts = [n for n in names if self._text_block(n) is not None and n in self.feature_info]
        modules = super().modules_by_name([n for n in names if n not in texts])
        modules.update({n: self.model.get_submodule(self._text_block(n)) for n in texts})
        return {n: modules[n] for n in names}

    @contextmanager
    def tap(self, names: Sequence[str], stop_early: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """The base :meth:`~difffeat.backbones.base.Backbone.tap`, with text-stream taps (see the class docstring)."""
        unique = list(dict.fromkeys(names))
        modules = self.modules_by_name(unique)  # validates every name
        texts = [n for n in unique if self._text_block(n) is not None]
        if not texts:
            with super().tap(unique, stop_early) as found:
                yield found
            return
        with super().tap([n for n in unique if n not in texts], stop_early=False) as found:

            def make_hook(name: str):
                def hook(_m: nn.Module, _i: Any, output: Any) -> None:
                    found[name] = self.read_output(name, output)

                return hook

            def stop(_m: nn.Module, _i: Any, _o: Any) -> None:
                if all(n in found for n in unique):
                    raise _StopForward

            handles = [modules[n].register_forward_hook(make_hook(n)) for n in texts]
            if stop_early:  # registered last: runs after every recording hook of its module
                distinct = {id(m): m for m in modules.values()}
                handles += [m.register_forward_hook(stop) for m in distinct.values()]
            try:
                yield found
            finally:
                for h in handles:
                    h.remove()

    def _text_of(self, block: str, output: Any, strict: bool = True) -> torch.Tensor | None:
        """The text stream of a joint block's output; ``None`` (or, ``strict``, an error) where it has none."""
        text = output[0] if isinstance(output, tuple | list) else None
        if text is None and strict:
            raise ValueError(f"tap {block}{TEXT_STREAM!r}: the block returned no text stream")
        return text

    def read_output(self, name: str, output: Any) -> torch.Tensor:
        """Element 0 (text) for ``<block>.text``, else the base's stream selection (image: element 1)."""
        block = self._text_block(name)
        if block is not None and block in self._joint_block_names():
            return self._text_of(block, output)
        return super().read_output(name, output)



def encode_sd3_prompts(pipeline_dir: str | Path, max_sequence_length: int, joint_attention_dim: int
                       ) -> PromptEncoder:
    """SD3's prompt encoding, as ``StableDiffusion3Pipeline.encode_prompt`` with ``clip_skip=None``.

    Each prompt goes to all three encoders (``prompt_2`` and ``prompt_3`` default to ``prompt``). Both CLIPs
    (``text_encoder``, ``text_encoder_2``: ``CLIPTextModelWithProjection``) get the prompt padded to the
    *first* tokenizer's ``model_max_length`` (the pipeline's ``tokenizer_max_length``, used for both) and
    truncated, without an attention mask, with ``output_hidden_states=True``; each gives ``hidden_states[-2]``
    and its projected pooled output ``output[0]``. The two hidden states are concatenated along the width and
    zero-padded to T5's width; T5 (``text_encoder_3``) gets the prompt padded to ``max_sequence_length`` and
    truncated (special tokens added), without a mask, and its last hidden state follows the CLIP tokens along
    the sequence. A pipeline without ``text_encoder_3`` (SD3 can run without T5) uses zeros of
    ``(max_sequence_length, joint_attention_dim)`` there, as the pipeline does.

    Args:
        pipeline_dir: an SD3 pipeline folder.
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256).
        joint_attention_dim: the transformer's text width (the zeros' width without T5).

    Returns:
        prompts → ``{"encoder_hidden_states": (B, 77 + max_sequence_length, W), "pooled_projections":
        (B, P1 + P2)}`` in float32, ``W`` T5's width (``joint_attention_dim`` without T5).

    Raises:
        FileNotFoundError: a CLIP encoder or a tokenizer is missing (named).
    """
    pipeline_dir = Path(pipeline_dir)
    components = pipeline_components(pipeline_dir)
    clips = [load_text_encoder(pipeline_dir, "text_encoder", "tokenizer"),
             load_text_encoder(pipeline_dir, "text_encoder_2", "tokenizer_2")]
    t5 = (load_text_encoder(pipeline_dir, "text_encoder_3", "tokenizer_3")
          if has_component(pipeline_dir, components, "text_encoder_3") else None)
    clip_length = int(clips[0][1].model_max_length)

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        for encoder, tokenizer in clips:
            out = encoder(tokenize(tokenizer, prompts, clip_length)["input_ids"], output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        if t5 is None:
            t5_embeds = torch.zeros(len(prompts), max_sequence_length, joint_attention_dim, dtype=hidden[0].dtype)
        else:
            encoder, tokenizer = t5
            t5_embeds = encoder(tokenize(tokenizer, prompts, max_sequence_length)["input_ids"])[0]
        clip_embeds = torch.cat(hidden, dim=-1)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_embeds, t5_embeds], dim=-2).float(),
                "pooled_projections": torch.cat(pooled, dim=-1).float()}

    return encode


def sd3_config(sample_size: int, num_layers: int, heads: int, head_dim: int, joint_attention_dim: int,
               pooled_projection_dim: int, patch_size: int = 2, in_channels: int = 16, pos_embed_max_size: int = 96,
               **extra: Any) -> dict[str, Any]:
    """An SD3-shaped ``SD3Transformer2DModel`` config (``caption_projection_dim`` = the transformer's width).

    SD3-medium: ``sample_size`` 128 (1024 px), 24 layers, 24 heads of 64, ``joint_attention_dim`` 4096,
    ``pooled_projection_dim`` 2048, 16 latent channels, ``pos_embed_max_size`` 192. SD3.5 adds ``extra``
    ``qk_norm="rms_norm"`` and, for SD3.5-medium, ``dual_attention_layers`` (0 … 12).
    """
    return {"sample_size": sample_size, "patch_size": patch_size, "in_channels": in_channels,
            "out_channels": in_channels, "num_layers": num_layers, "attention_head_dim": head_dim,
            "num_attention_heads": heads, "joint_attention_dim": joint_attention_dim,
            "caption_projection_dim": heads * head_dim, "pooled_projection_dim": pooled_projection_dim,
            "pos_embed_max_size": pos_embed_max_size, **extra}


@register_adapter
class SD3Backbone(TextStreamTaps, TextConditioned):
    """Stable Diffusion 3 / 3.5: an MMDiT on flow-matching latents; taps are image tokens on the patch grid.

    The condition dict holds ``encoder_hidden_states`` ``(B, 77 + max_sequence_length, joint_attention_dim)``
    and ``pooled_projections`` ``(B, pooled_projection_dim)`` (:func:`encode_sd3_prompts`). The default
    condition follows :class:`~difffeat.backbones.text.TextConditioned`: from a pipeline folder, the empty
    prompt encoded, which is the pipeline's unconditional branch (its default negative prompt ``""``, T5
    zeros where the folder has no ``text_encoder_3``); otherwise zeros, with a warning.

    Timesteps: the extractor passes :meth:`~difffeat.noise.FlowSchedule.model_timesteps`, ``σ · 1000``, which is
    what ``StableDiffusion3Pipeline`` gives the transformer as ``timestep`` (the scheduler's ``timesteps``);
    the schedule is the folder's ``FlowMatchEulerDiscreteScheduler`` (shift 3.0 for SD3-medium, the default
    here too). Images are encoded with the VAE's ``shift_factor`` (:meth:`Backbone.encode`).

    Taps: ``pos_embed`` (the embedded patch tokens), ``transformer_blocks.i`` (the image stream of joint
    block ``i``) and ``transformer_blocks.i.text`` (its text stream, see :class:`TextStreamTaps`; not for
    the last block, which is ``context_pre_only`` and returns no text). Image taps are ``(B, N, D)`` tokens on
    the ``sample_size / patch_size`` grid at the probe size; text taps ``(B, 77 + L, D)`` tokens without a
    grid (read them with :class:`~difffeat.readout.GlobalAvg` / ``TokenMean``). SD3.5's qk-norm and dual
    attention blocks (``dual_attention_layers``) change no tap: their blocks return the same two streams.

    Args:
        model: the diffusers ``SD3Transformer2DModel``.
        schedule: its noise schedule.
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256).
        **kwargs: see :class:`~difffeat.backbones.text.TextConditioned` (``condition``, ``null_embedding``,
            ``pipeline_dir``, ``vae``, ``name``).
    """

    model_class = "SD3Transformer2DModel"
    default_scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,  # noqa: RUF012
                         "shift": 3.0}
    condition_keys = ("encoder_hidden_states", "pooled_projections")
    output_streams = {"transformer_blocks": 1}  # noqa: RUF012 (joint blocks return (text, image))

    def __init__(self, model: nn.Module, schedule: Any, max_sequence_length: int = 256, **kwargs: Any) -> None:
        self.max_sequence_length = int(max_sequence_length)  # read while the default condition is resolved
        super().__init__(model, schedule, **kwargs)

    def null_shapes(self) -> dict[str, tuple[int, ...]]:
        """Zeros of ``77 + max_sequence_length`` tokens of ``joint_attention_dim``, and a zero pooled vector."""
        cfg = self.model.config
        return {"encoder_hidden_states": (1, CLIP_TOKENS + self.max_sequence_length, int(cfg.joint_attention_dim)),
                "pooled_projections": (1, int(cfg.pooled_projection_dim))}

    def load_prompt_encoder(self) -> PromptEncoder:
        """Both CLIPs and T5 (or T5 zeros) as the pipeline encodes them (:func:`encode_sd3_prompts`)."""
        return encode_sd3_prompts(self.pipeline_dir, self.max_sequence_length,
                                  int(self.model.config.joint_attention_dim))

    def condition_spec(self) -> dict[str, Any]:
        """Digests of the default condition and the T5 tokens per prompt."""
        return {**super().condition_spec(), "max_sequence_length": self.max_sequence_length}

    def tap_names(self) -> list[str]:
        """``pos_embed`` and every joint block ``transformer_blocks.i`` (their ``.text`` taps come from the probe)."""
        return ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(self.model.transformer_blocks))]

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """The square patch grid at the probe size, ``sample_size // patch_size`` per side.

        Raises:
            ValueError: ``num_tokens`` does not fill it (text tokens, or a joint attention's image+text keys).
        """
        side = self.latent_size // int(self.model.config.patch_size)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens do not fill the {side}x{side} patch grid")
        return side, side

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The transformer's velocity prediction at timestep ``t`` (``σ · 1000``), as the pipeline calls it.

        Raises:
            ValueError: a condition whose batch is neither 1 nor that of ``x_t``.
        """
        c = self.condition(cond, x_t.shape[0], x_t.dtype, x_t.device)
        timestep = t.expand(x_t.shape[0]) if t.ndim == 1 and t.shape[0] == 1 else t
        return self.model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=c["encoder_hidden_states"],
                          pooled_projections=c["pooled_projections"], return_dict=False)[0]

