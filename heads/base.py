"""``FrozenFeatureModule``: the LightningModule every head on frozen diffusion features builds on.

Frozen means frozen: the backbone has ``requires_grad_(False)``, is put back in ``eval()`` at every
epoch start (whatever Lightning's ``train()`` did), runs under ``inference_mode``, is left out of the
optimizer (:meth:`head_parameters`) and out of the head's checkpoint (:meth:`state_dict` drops it; a
loaded head keeps the backbone it was built with). Features come from one of two sources, chosen by
config:

* ``backbone`` + ``layers`` + ``timesteps`` (+ readout, ensemble, …): computed online by a
  :class:`~difffeat.extract.FeatureExtractor` from the batch's ``image`` and ``index``;
* ``store``: read from a feature store (the batch holds the stored tensors by name, as
  :class:`~difffeat.store.StoreDataset` yields them), so no backbone is loaded at all.

Either way a subclass asks :meth:`features` for ``{feature name: tensor}`` and trains only its head.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from difffeat.extract import DEFAULT_BATCH_SIZE, FeatureExtractor, feature_name, parse_feature_name
from difffeat.readout import Readout
from difffeat.store import FeatureStore

__all__ = ["FrozenFeatureModule", "FrozenPartState"]

_FROZEN = "extractor."


class FrozenPartState:
    """A module mixin for a frozen part under the attribute prefix ``frozen_prefix``.

    The part stays out of the optimiser (:meth:`unfrozen_parameters`) and out of checkpoints
    (:meth:`state_dict` drops it), and :meth:`load_state_dict` keeps the weights it was built with. List it
    before ``nn.Module`` bases.
    """

    frozen_prefix: str = _FROZEN

    def unfrozen_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the frozen part."""
        return (p for n, p in self.named_parameters() if not n.startswith(self.frozen_prefix))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The state without the frozen part."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for key in [k for k in state if k.startswith(prefix + self.frozen_prefix)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loads a state without the frozen part; the frozen part keeps the weights it was built with."""
        own = {k: v for k, v in super().state_dict().items() if k.startswith(self.frozen_prefix)}
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)


class FrozenFeatureModule(FrozenPartState, L.LightningModule):
    """A head's LightningModule on a frozen backbone's features, online or from a store.

    Args:
        backbone: a registered name, a local diffusers folder or a cached hub id (online features).
        layers: tap names (online), or a filter on the stored features' layers.
        timesteps: DDPM indices (online), or a filter on the stored features' timesteps.
        readout: how a tap becomes a feature (online; default global average).
        ensemble: noise draws averaged per feature (online).
        seed: noise seed (online).
        batch_size: extractor rows per forward (online; does not change the features).
        noise: noise key rule, ``"index"`` or ``"content"`` (online).
        backbone_kwargs: extra ``create_backbone`` arguments (online).
        store: a feature-store folder; when given, features are read from batches instead.

    Raises:
        ValueError: neither or both of ``backbone`` and ``store``; no feature selected.
    """

    def __init__(self, backbone: str | None = None, layers: Sequence[str] | None = None,
                 timesteps: Sequence[int] | None = None, readout: Readout | None = None, ensemble: int = 1,
                 seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, noise: str = "index",
                 backbone_kwargs: dict[str, Any] | None = None, store: str | None = None) -> None:
        super().__init__()
        if (backbone is None) == (store is None):
            raise ValueError("give exactly one feature source: backbone (online features) or store (stored ones)")
        self.extractor: FeatureExtractor | None = None
        if backbone is not None:
            if not layers or not timesteps:
                raise ValueError("online features need layers and timesteps")
            self.extractor = FeatureExtractor.from_name(backbone, layers, timesteps, backbone_kwargs,
                                                        readout=readout, ensemble=ensemble, seed=seed,
                                                        batch_size=batch_size, noise=noise)
            self.feature_names = [feature_name(k) for k in self.extractor.keys]
        else:
            self.feature_names = self._stored_names(FeatureStore.open(store), layers, timesteps)

    @staticmethod
    def _stored_names(store: FeatureStore, layers: Sequence[str] | None, timesteps: Sequence[int] | None
                      ) -> list[str]:
        names = []
        for name in store.names():
            try:
                layer, t = parse_feature_name(name)
            except ValueError:  # index, label, split, masks
                continue
            if (layers is None or layer in layers) and (timesteps is None or t in timesteps):
                names.append(name)
        if not names:
            raise ValueError(f"{store.root} holds no feature for layers {layers} and timesteps {timesteps}; "
                             f"it holds {store.names()}")
        return names

    # ------------------------------------------------------------------ features
    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{feature name: tensor}`` for a batch: the stored tensors, or the extractor's on ``image``.

        Raises:
            KeyError: a store-fed batch lacks a feature (the batch's keys are listed).
        """
        if self.extractor is None:
            missing = [n for n in self.feature_names if n not in batch]
            if missing:
                raise KeyError(f"batch has no stored feature(s) {missing}; it holds {sorted(batch)}")
            return {n: batch[n].float() for n in self.feature_names}
        feats = self.extractor(batch["image"], batch.get("index"))
        # clone: inference-mode tensors cannot enter autograd in the head
        return {feature_name(k): v.clone() for k, v in feats.items()}

    # ------------------------------------------------------------------ frozen means frozen
    def on_fit_start(self) -> None:
        """Checks the backbone is frozen before any step."""
        if self.extractor is not None and any(p.requires_grad for p in self.extractor.backbone.parameters()):
            raise RuntimeError("the backbone of a frozen-feature head has trainable parameters")

    def on_train_epoch_start(self) -> None:
        """Puts the backbone back in eval mode (dropout off, norm statistics fixed)."""
        if self.extractor is not None:
            self.extractor.backbone.eval()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: everything but the backbone."""
        return self.unfrozen_parameters()

