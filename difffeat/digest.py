"""Content digests: one definition of "the same tensors" and "the same settings" for every key.

Store keys, shard checksums and model keys all hash through :func:`tensor_digest` (names, shapes, dtypes
and raw bytes, 0-dim tensors included) and :func:`spec_key` (canonical JSON).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["spec_key", "tensor_digest"]


def tensor_digest(tensors: Mapping[str, torch.Tensor] | torch.Tensor) -> str:
    """SHA-256 over tensors' names, shapes, dtypes and bytes, in name order.

    Args:
        tensors: a ``{name: tensor}`` mapping (a state dict) or one tensor.

    Returns:
        The hex digest; equal exactly when every name, shape, dtype and bit is equal.
    """
    if isinstance(tensors, torch.Tensor):
        tensors = {"": tensors}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1) first: a 0-dim tensor cannot be viewed as bytes directly
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def spec_key(spec: Mapping[str, Any]) -> str:
    """SHA-256 of a spec's canonical (sorted-key) JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
