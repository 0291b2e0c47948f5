"""Classification heads on diffusion features: linear probes.

Two ways in:

* :func:`fit_linear_probes` / :func:`probe_store` train *one linear head per cached feature* (every
  layer × timestep of a :class:`~difffeat.store.FeatureStore`) in a single full-batch L-BFGS pass: the
  heads share nothing, so the summed loss decomposes and one optimisation trains them all.
* :class:`LinearProbeModule` is the online LightningModule (frozen extractor + linear head) for
  ``difffeat fit``.

Probe protocol (choices, as no single paper fixes them for this setting): features are standardised
with the mean and standard deviation of the *unlabelled* training split. Two linear classifiers:

* :func:`fit_lda_probes` (the sweep's default): linear discriminant analysis with a Ledoit–Wolf shrunk
  pooled within-class covariance. It is closed-form and has no hyperparameter (the shrinkage is
  estimated from the labelled samples), which is what the few-label regimes need: on the digits study,
  chosen on a validation split carved from the training split, it beat L2 logistic regression over a
  λ grid at 1, 5, 10 labels per class and with all labels. With one label per class the within-class
  scatter is empty and it is nearest class mean (Euclidean), the limit of full shrinkage.
* :func:`fit_linear_probes`: multinomial logistic regression with an L2 penalty ``λ‖W‖²/2`` trained
  with full-batch L-BFGS; :func:`select_weight_decay` picks ``λ`` by stratified k-fold
  cross-validation on the labelled samples alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from difffeat.extract import FeatureExtractor
from difffeat.readout import Readout

__all__ = [
    "LDAProbe",
    "LinearProbeModule",
    "MultiLinearProbe",
    "TimmClassifierModule",
    "fit_lda",
    "fit_lda_probes",
    "fit_linear_probes",
    "format_cell",
    "labelled_subset",
    "lda_accuracies",
    "ledoit_wolf",
    "ledoit_wolf_shrinkage",
    "probe_accuracies",
    "probe_ensemble",
    "probe_loss",
    "probe_store",
    "probe_sweep",
    "select_by_validation",
    "select_weight_decay",
    "standardise",
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


def ledoit_wolf_shrinkage(xc: torch.Tensor) -> tuple[float, float]:
    """Ledoit–Wolf (2004) shrinkage ``s`` and target scale ``μ = tr(S) / p`` for centred rows ``xc``.

    Computed from the ``n × n`` Gram matrix, never the ``p × p`` covariance: ``Σ_ij S_ij² = ‖xc xcᵀ‖²_F / n²``
    and ``Σ_k ‖x_k‖⁴`` replace the covariance-sized terms, so the cost is ``O(n² p)``.
    """
    n, p = xc.shape
    sq = xc.pow(2).sum(1)  # ‖x_k‖²
    trace = sq.sum() / n
    mu = trace / p
    delta_ = (xc @ xc.T).pow(2).sum() / n**2
    beta = (sq.pow(2).sum() / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * trace + p * mu**2) / p
    shrink = 0.0 if float(delta) == 0 else float(torch.clamp(beta, max=delta) / delta)
    return min(max(shrink, 0.0), 1.0), float(mu)


def ledoit_wolf(xc: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit–Wolf shrunk covariance ``(1 - s) S + s μ I`` of centred rows ``xc`` and its shrinkage ``s``."""
    shrink, mu = ledoit_wolf_shrinkage(xc)
    emp = xc.T @ xc / xc.shape[0]
    return (1 - shrink) * emp + shrink * mu * torch.eye(xc.shape[1], dtype=xc.dtype), shrink


@dataclass
class LDAProbe:
    """A fitted linear discriminant: ``logits = x Wᵀ + b``."""

    weight: torch.Tensor
    bias: torch.Tensor
    shrinkage: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight.T + self.bias


def fit_lda(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> LDAProbe:
    """Shrinkage LDA with equal class priors (the labelled subsets are balanced)."""
    x = x.double()
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ValueError(f"every class needs a labelled sample; counts per class: {counts.tolist()}")
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype).index_add_(0, y, x) / counts[:, None]
    xc = x - means[y]
    n, p = xc.shape
    shrink, mu = ledoit_wolf_shrinkage(xc) if n > num_classes else (1.0, 1.0)
    a, b = shrink * mu, (1 - shrink) / n  # Σ = a I + b xcᵀ xc
    if n - num_classes < 1 or b == 0:  # one sample per class: no within-class scatter, nearest class mean
        weight, shrink = means.clone(), 1.0
    elif n < p and a > 0:  # Woodbury: Σ⁻¹ M = (M - xcᵀ (a/b I + xc xcᵀ)⁻¹ xc M) / a, an n × n solve
        inner = torch.linalg.solve(a / b * torch.eye(n, dtype=x.dtype) + xc @ xc.T, xc @ means.T)
        weight = ((means.T - xc.T @ inner) / a).T
    else:
        cov = a * torch.eye(p, dtype=x.dtype) + b * (xc.T @ xc)
        weight = torch.linalg.solve(cov, means.T).T
    bias = -0.5 * (means * weight).sum(1)
    return LDAProbe(weight, bias, shrink)


def fit_lda_probes(feats: Mapping[str, torch.Tensor], y: torch.Tensor, num_classes: int) -> dict[str, LDAProbe]:
    """One shrinkage-LDA head per feature; closed form, so one pass over the features fits them all."""
    return {n: fit_lda(f, y, num_classes) for n, f in feats.items()}


@torch.no_grad()
def lda_accuracies(probes: Mapping[str, LDAProbe], feats: Mapping[str, torch.Tensor],
                   y: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of every LDA head."""
    return {n: (p(feats[n]).argmax(1) == y).double().mean().item() for n, p in probes.items()}


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


# ----------------------------------------------------------------------------- sweeps over stores
META = ("split", "label", "index")


def standardise(data: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Store tensors → (features standardised with unlabelled train statistics, labels, train mask).

    ``data`` needs ``label`` and ``split`` (0 = train, 1 = test); every other tensor but ``index`` is a
    feature (flattened).
    """
    missing = [k for k in ("label", "split") if k not in data]
    if missing:
        raise KeyError(f"probing needs {missing} tensors beside the features; found {sorted(data)}")
    train = data["split"] == 0
    feats = {}
    for name, f in data.items():
        if name in META:
            continue
        f = f.double().flatten(1)
        feats[name] = (f - f[train].mean(0)) / (f[train].std(0) + 1e-6)
    return feats, data["label"].long(), train


def select_by_validation(feats: Mapping[str, torch.Tensor], y: torch.Tensor, train: torch.Tensor,
                         per_class: int, seeds: Sequence[int], num_classes: int | None = None,
                         split_seeds: Sequence[int] = (123, 124)) -> tuple[str, dict[str, float]]:
    """The feature whose LDA probe has the best mean validation accuracy at ``per_class`` labels.

    Validation uses only the training split: for each of ``split_seeds`` a stratified third of it is
    held out and labelled subsets (``per_class`` per class, one per seed; ``0`` = all) are drawn from
    the other two thirds. Scores are averaged over splits and seeds, as one split is a noisy judge.

    Returns:
        The best feature name and every feature's mean validation accuracy.
    """
    num_classes = num_classes or int(y.max()) + 1
    idx = train.nonzero().flatten()
    scores = dict.fromkeys(feats, 0.0)
    runs = [(s, seed) for s in split_seeds for seed in (seeds if per_class else list(seeds)[:1])]
    for split_seed, seed in runs:
        gen = torch.Generator().manual_seed(split_seed)
        held = torch.zeros(len(idx), dtype=torch.bool)
        for c in torch.unique(y[idx]):
            members = (y[idx] == c).nonzero().flatten()
            held[members[torch.randperm(len(members), generator=gen)][: len(members) // 3]] = True
        dev, val = idx[~held], idx[held]
        pick = dev[labelled_subset(y[dev], per_class, seed)]
        probes = fit_lda_probes({n: f[pick] for n, f in feats.items()}, y[pick], num_classes)
        for n, acc in lda_accuracies(probes, {n: f[val] for n, f in feats.items()}, y[val]).items():
            scores[n] += acc / len(runs)
    return max(feats, key=lambda n: scores[n]), scores


def probe_ensemble(feats: Mapping[str, torch.Tensor], names: Sequence[str], y: torch.Tensor, train: torch.Tensor,
                   per_class: int, seeds: Sequence[int], num_classes: int | None = None) -> list[float]:
    """Test accuracy of averaging the class posteriors of LDA probes on several features."""
    num_classes = num_classes or int(y.max()) + 1
    test, tr_idx = ~train, train.nonzero().flatten()
    accs = []
    for seed in seeds if per_class else list(seeds)[:1]:
        pick = tr_idx[labelled_subset(y[tr_idx], per_class, seed)]
        probes = fit_lda_probes({n: feats[n][pick] for n in names}, y[pick], num_classes)
        posterior = sum(torch.softmax(probes[n](feats[n][test]), 1) for n in names)
        accs.append((posterior.argmax(1) == y[test]).double().mean().item())
    return accs


def probe_sweep(feats: Mapping[str, torch.Tensor], y: torch.Tensor, train: torch.Tensor,
                regimes: Sequence[int], seeds: Sequence[int],
                num_classes: int | None = None) -> dict[str, dict[int, list[float]]]:
    """Test accuracy of an LDA probe on every feature, per label regime (0 = all labels) and seed.

    All heads of one (regime, seed) are fitted in one pass. The all-labels regime is deterministic and
    run once.
    """
    num_classes = num_classes or int(y.max()) + 1
    test = ~train
    tr_idx = train.nonzero().flatten()
    out: dict[str, dict[int, list[float]]] = {n: {} for n in feats}
    for regime in regimes:
        for seed in seeds if regime else list(seeds)[:1]:
            pick = tr_idx[labelled_subset(y[tr_idx], regime, seed)]
            probes = fit_lda_probes({n: f[pick] for n, f in feats.items()}, y[pick], num_classes)
            for n, acc in lda_accuracies(probes, {n: f[test] for n, f in feats.items()}, y[test]).items():
                out[n].setdefault(regime, []).append(acc)
    return out


def format_cell(values: Sequence[float]) -> str:
    """Accuracies as a percentage, ``mean ± std`` when there are several."""
    v = torch.tensor(values, dtype=torch.float64) * 100
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(unbiased=False):.1f}"


def probe_store(store: str, regimes: Sequence[int] = (1, 5, 10, 0), seeds: Sequence[int] = (0, 1, 2)) -> str:
    """LDA probe sweep over every feature of a feature store; returns a Markdown table."""
    from difffeat.store import FeatureStore

    feats, y, train = standardise(FeatureStore.open(store).load())
    acc = probe_sweep(feats, y, train, regimes, seeds)
    heads = ["all labels" if r == 0 else f"{r} / class" for r in regimes]
    lines = ["| feature | " + " | ".join(heads) + " |", "|---" * (len(regimes) + 1) + "|"]
    for name, per in acc.items():
        lines.append(f"| `{name}` | " + " | ".join(format_cell(per[r]) for r in regimes) + " |")
    return "\n".join(lines)


class TimmClassifierModule(L.LightningModule):
    """Trains a timm model as an image classifier and exports its weights for timm to load.

    This is how the project makes a frozen ViT teacher for REPA / HASTE on data that ships here: a small
    ViT (e.g. ``vit_tiny_patch16_224`` with ``patch_size=2, in_chans=1``) trained with labels on the
    digits *training* split only; its patch tokens then serve as the alignment target. The export is a
    plain safetensors state dict that ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay={"file": path}, **model_kwargs)`` loads, the same path a downloaded timm
    checkpoint takes.

    Args:
        model_name: timm architecture.
        model_kwargs: architecture arguments (``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, …).
        num_classes: classes.
        lr: AdamW learning rate (cosine decay to 0).
        weight_decay: AdamW weight decay.
        export_path: where the weights are written when training ends (atomically).
    """

    def __init__(self, model_name: str = "vit_tiny_patch16_224", model_kwargs: dict[str, Any] | None = None,
                 num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 0.05,
                 export_path: str | None = None) -> None:
        super().__init__()
        import timm

        self.save_hyperparameters()
        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
        self.lr, self.weight_decay, self.export_path = lr, weight_decay, export_path
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.model(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_acc(self.model(batch["image"]), batch["label"])
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(int(self.trainer.estimated_stepping_batches), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            from pathlib import Path

            from safetensors.torch import save

            from difffeat.store import atomic_write

            Path(self.export_path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.export_path, save({k: v.detach().cpu().contiguous()
                                                 for k, v in self.model.state_dict().items()}))
