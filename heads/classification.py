"""Classification heads on diffusion features: linear probes.

Two ways in:

* :func:`fit_linear_probes` / :func:`probe_store` train *one linear head per cached feature* (every
  layer × timestep of a :class:`~difffeat.store.FeatureStore`) in a single full-batch L-BFGS pass: the
  heads share nothing, so the summed loss decomposes and one optimisation trains them all.
* :class:`LinearProbeModule` is the online LightningModule (frozen extractor + linear head) for
  ``difffeat fit``.

Probe protocol (choices, as no single paper fixes them for this setting): features are standardised
with the mean and standard deviation of the *unlabelled* training split; the head is multinomial
logistic regression with an L2 penalty ``λ‖W‖²/2`` per sample-mean loss, trained to convergence with
L-BFGS. ``λ`` comes from a fixed grid and is chosen per head by stratified k-fold cross-validation on
the labelled subset alone (the test split is never looked at), which matters most with few labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from difffeat.extract import FeatureExtractor
from difffeat.readout import Readout

__all__ = [
    "LinearProbeModule",
    "MultiLinearProbe",
    "fit_linear_probes",
    "labelled_subset",
    "probe_accuracies",
    "probe_loss",
    "select_weight_decay",
]

DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def _key(name: str) -> str:
    return name.replace(".", "·")  # ModuleDict keys may not contain "."


class MultiLinearProbe(nn.Module):
    """Independent linear heads, one per named feature (and per weight decay, if several).

    Args:
        dims: feature name → input width.
        num_classes: classes.
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.heads = nn.ModuleDict({_key(n): nn.Linear(d, num_classes) for n, d in dims.items()})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.heads[_key(n)](feats[n]) for n in self.names}


def probe_loss(probe: MultiLinearProbe, feats: Mapping[str, torch.Tensor], y: torch.Tensor,
               weight_decay: float | Mapping[str, float]) -> torch.Tensor:
    """Sum over heads of mean cross-entropy plus ``λ/2 ‖W‖²`` (bias unpenalised)."""
    logits = probe(feats)
    total = torch.zeros((), dtype=next(probe.parameters()).dtype)
    for n, z in logits.items():
        lam = weight_decay[n] if isinstance(weight_decay, Mapping) else weight_decay
        total = total + F.cross_entropy(z, y) + 0.5 * lam * probe.heads[_key(n)].weight.pow(2).sum()
    return total


def fit_linear_probes(feats: Mapping[str, torch.Tensor], y: torch.Tensor, num_classes: int,
                      weight_decay: float | Mapping[str, float] = 1e-3, max_iter: int = 200) -> MultiLinearProbe:
    """Trains one linear head per feature in one full-batch L-BFGS pass (float64, convex)."""
    feats = {n: f.double() for n, f in feats.items()}
    probe = MultiLinearProbe({n: f.shape[1] for n, f in feats.items()}, num_classes).double()
    opt = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = probe_loss(probe, feats, y, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.eval()


@torch.no_grad()
def probe_accuracies(probe: MultiLinearProbe, feats: Mapping[str, torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of every head."""
    logits = probe({n: f.double() for n, f in feats.items()})
    return {n: (z.argmax(1) == y).double().mean().item() for n, z in logits.items()}


def labelled_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` samples of every class, drawn with ``seed`` (``0`` = all samples)."""
    if per_class <= 0:
        return torch.arange(len(y))
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y):
        members = (y == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {int(c)} has {len(members)} samples, fewer than {per_class} requested")
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks).sort().values


def _folds(y: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Stratified fold ids: sample ``i`` of class ``c`` goes to fold ``rank % k``."""
    gen = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for c in torch.unique(y):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        fold[members] = torch.arange(len(members)) % k
    return [fold == i for i in range(k)]


def select_weight_decay(feats: Mapping[str, torch.Tensor], y: torch.Tensor, num_classes: int,
                        grid: Sequence[float] = DEFAULT_WEIGHT_DECAYS, folds: int = 5, seed: int = 0,
                        max_iter: int = 100) -> dict[str, float]:
    """Per-feature ``λ`` by stratified k-fold cross-validation on the labelled samples only.

    With one label per class there is nothing to hold out; the largest grid value is returned (the
    strongest prior is the safe choice with ten samples). Folds are capped by the smallest class count.
    """
    k = min(folds, int(torch.bincount(y).min()))
    if k < 2:
        return dict.fromkeys(feats, max(grid))
    correct = {(n, lam): 0 for n in feats for lam in grid}
    for held in _folds(y, k, seed):
        train = {n: f[~held] for n, f in feats.items()}
        test = {n: f[held] for n, f in feats.items()}
        for lam in grid:
            probe = fit_linear_probes(train, y[~held], num_classes, lam, max_iter)
            for n, acc in probe_accuracies(probe, test, y[held]).items():
                correct[(n, lam)] += acc * int(held.sum())
    # ties go to the larger λ (iterate the grid from strongest to weakest)
    return {n: max(sorted(grid, reverse=True), key=lambda lam, n=n: correct[(n, lam)]) for n in feats}


class LinearProbeModule(L.LightningModule):
    """A linear classifier on frozen diffusion features (layers × timesteps concatenated).

    The backbone never trains: ``requires_grad_(False)``, put back in eval mode every epoch, features
    computed under ``inference_mode``. Features are normalised by a non-affine batch norm (running
    statistics), the online counterpart of the standardisation used by :func:`probe_store`.

    Args:
        backbone: a registered name, a local diffusers folder or a cached hub id.
        layers: tap names.
        timesteps: DDPM indices (0 = least noise).
        readout: how each tap becomes a vector (default global average).
        ensemble: noise draws averaged per feature.
        num_classes: classes.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, backbone: str, layers: list[str], timesteps: list[int], readout: Readout | None = None,
                 ensemble: int = 1, num_classes: int = 10, lr: float = 1e-2, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.extractor = FeatureExtractor.from_name(backbone, layers, timesteps, readout=readout, ensemble=ensemble)
        dim = self._feature_dim()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, num_classes)
        self.lr, self.weight_decay = lr, weight_decay
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def _feature_dim(self) -> int:
        backbone = self.extractor.backbone
        x = torch.zeros(1, backbone.image_channels, backbone.image_size, backbone.image_size)
        return self.features(x, torch.zeros(1, dtype=torch.long)).shape[1]

    def features(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Concatenated, flattened features (computed without grad)."""
        feats = self.extractor(images, indices)
        return torch.cat([f.flatten(1) for f in feats.values()], 1).clone()

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(images, indices)))

    def on_train_epoch_start(self) -> None:
        self.extractor.backbone.eval()  # frozen means frozen, whatever Lightning's train() did

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"], batch["index"])
        loss = F.cross_entropy(logits, batch["label"])
        self.train_acc(logits, batch["label"])
        self.log_dict({"train/loss": loss, "train/acc": self.train_acc}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_acc(self(batch["image"], batch["index"]), batch["label"])
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if not n.startswith("extractor.")]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
