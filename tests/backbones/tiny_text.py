"""Tiny CLIP and T5 text encoders with their tokenizers, built offline, for pipeline tests.

Shared by the text-conditioned adapter tests (SD-1/2, SDXL, PixArt, SD3, Flux); keep the API stable:

* :func:`write_clip` ``(folder, hidden=32, projection=None, seed=0, ...)`` writes a ``CLIPTextModel`` (or,
  with ``projection``, a ``CLIPTextModelWithProjection``) to ``folder/<encoder>`` and a ``CLIPTokenizer`` to
  ``folder/<tokenizer>``, and returns both as loaded back with transformers' ``from_pretrained``;
* :func:`write_t5` ``(folder, d_model=32, seed=0, ...)`` does the same for a ``T5EncoderModel`` and a
  ``T5TokenizerFast``;
* :func:`write_clip_tokenizer` / :func:`write_t5_tokenizer` write only the tokenizer;
* :func:`tiny_vae` ``(latent_channels=4, seed=0)`` is a 2-level ``AutoencoderKL`` (factor 2) for the pipelines.

Pass the returned objects to a diffusers pipeline's constructor and ``save_pretrained`` it, or use the
folders directly. No file is downloaded: the CLIP tokenizer is a byte-level BPE from a ``vocab.json`` and a
``merges.txt`` written here (the 256 byte symbols, their ``</w>`` word-final forms, merges spelling a few
words, and CLIP's two special tokens, in CLIP's own order); the T5 tokenizer is a ``tokenizers`` Unigram model
over single characters and a few words, saved as ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["WORDS", "tiny_vae", "write_clip", "write_clip_tokenizer", "write_t5", "write_t5_tokenizer"]

#: words spelled by whole tokens (others fall back to characters)
WORDS = ("a", "photo", "of", "the", "dog", "cat", "red", "car", "tree", "painting", "house", "blue")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-symbol table, which CLIP's byte-level BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer(folder: str | Path, max_length: int = 77):
    """Writes a CLIP tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) and loads it.

    Returns:
        ``transformers.CLIPTokenizer.from_pretrained(folder)``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if f"{parts[0]} {parts[1]}" not in merges:
                merges.append(f"{parts[0]} {parts[1]}")
                vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def write_clip(folder: str | Path, hidden: int = 32, projection: int | None = None, seed: int = 0,
               layers: int = 2, heads: int = 2, encoder: str = "text_encoder", tokenizer: str = "tokenizer",
               max_length: int = 77):
    """Writes a tiny CLIP text encoder to ``folder/encoder`` and its tokenizer to ``folder/tokenizer``.

    Args:
        folder: the (pipeline) folder.
        hidden: the encoder's width.
        projection: ``None`` for a ``CLIPTextModel`` (SD-1/2, SDXL's first encoder), else the
            ``projection_dim`` of a ``CLIPTextModelWithProjection`` (SDXL's second encoder, SD3's).
        seed: seeds the random weights.
        layers: transformer layers (at least 2, so that ``hidden_states[-2]`` differs from the last).
        heads: attention heads.
        encoder: the encoder's sub-folder (``text_encoder``, ``text_encoder_2``).
        tokenizer: the tokenizer's sub-folder (``tokenizer``, ``tokenizer_2``).
        max_length: the tokenizer's ``model_max_length`` and the encoder's positions.

    Returns:
        ``(encoder, tokenizer)`` loaded back from the folders with transformers' ``from_pretrained``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tok = write_clip_tokenizer(folder / tokenizer, max_length)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            projection_dim=projection or hidden, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act="quick_gelu")
    cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.save_pretrained(folder / encoder)
    return cls.from_pretrained(folder / encoder, local_files_only=True).eval(), tok


def write_t5_tokenizer(folder: str | Path):
    """Writes a T5 tokenizer (a ``tokenizers`` Unigram model, ``tokenizer.json``) and loads it.

    The ids follow T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the pieces.

    Returns:
        ``transformers.T5TokenizerFast.from_pretrained(folder)``.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    seen = {p for p, _ in pieces}
    pieces += [(c, -3.0) for c in chars] + [(f"▁{c}", -3.5) for c in chars if f"▁{c}" not in seen]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_ids": 0,
    }))
    return T5TokenizerFast.from_pretrained(folder, local_files_only=True)


def write_t5(folder: str | Path, d_model: int = 32, seed: int = 0, layers: int = 2, heads: int = 2,
             encoder: str = "text_encoder", tokenizer: str = "tokenizer"):
    """Writes a tiny ``T5EncoderModel`` to ``folder/encoder`` and its tokenizer to ``folder/tokenizer``.

    Args:
        folder: the (pipeline) folder.
        d_model: the encoder's width (the denoiser's ``caption_channels`` / joint attention input).
        seed: seeds the random weights.
        layers: encoder layers.
        heads: attention heads.
        encoder: the encoder's sub-folder (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``).
        tokenizer: the tokenizer's sub-folder.

    Returns:
        ``(encoder, tokenizer)`` loaded back from the folders with transformers' ``from_pretrained``.
    """
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    tok = write_t5_tokenizer(folder / tokenizer)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // heads,
                      num_layers=layers, num_heads=heads, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(folder / encoder)
    return T5EncoderModel.from_pretrained(folder / encoder, local_files_only=True).eval(), tok


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    """A seeded 2-level ``AutoencoderKL`` (8 and 16 channels, a factor of 2) on RGB images, in eval mode."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                             block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                             up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, sample_size=16,
                             layers_per_block=1).eval()
