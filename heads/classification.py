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
  scatter is empty and it is nearest class mean (Euclidean), the limit of full shrinkage. Every probe
  returns class log-posteriors, so posteriors of probes on different features can be averaged
  (:func:`probe_ensemble`) without the feature with the largest numbers taking over.
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

from difffeat.readout import Readout
from difffeat.store import FeatureStore
from heads.base import FrozenFeatureModule

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
    """Independent linear heads, one per named feature, zero-initialised.

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
        """Logits of every head.

        Args:
            feats: feature name → ``(m, width)`` features (every name given at construction).

        Returns:
            Feature name → ``(m, classes)`` logits.
        """
        return {n: self.heads[_key(n)](feats[n]) for n in self.names}


def probe_loss(probe: MultiLinearProbe, feats: Mapping[str, torch.Tensor], y: torch.Tensor,
               weight_decay: float | Mapping[str, float]) -> torch.Tensor:
    """Sum over heads of mean cross-entropy plus ``λ/2 ‖W‖²`` (bias unpenalised).

    Args:
        probe: the heads.
        feats: feature name → ``(n, width)`` features.
        y: ``(n,)`` labels.
        weight_decay: ``λ``, one for all heads or one per feature name.

    Returns:
        The scalar loss.
    """
    logits = probe(feats)
    total = torch.zeros((), dtype=next(probe.parameters()).dtype)
    for n, z in logits.items():
        lam = weight_decay[n] if isinstance(weight_decay, Mapping) else weight_decay
        total = total + F.cross_entropy(z, y) + 0.5 * lam * probe.heads[_key(n)].weight.pow(2).sum()
    return total


def fit_linear_probes(feats: Mapping[str, torch.Tensor], y: torch.Tensor, num_classes: int,
                      weight_decay: float | Mapping[str, float] = 1e-3, max_iter: int = 200) -> MultiLinearProbe:
    """Trains one linear head per feature in one full-batch L-BFGS pass (float64, convex).

    Args:
        feats: feature name → ``(n, width)`` labelled features.
        y: ``(n,)`` labels.
        num_classes: classes.
        weight_decay: ``λ``, one for all heads or one per feature name.
        max_iter: L-BFGS iterations.

    Returns:
        The trained heads, in eval mode.
    """
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
    """Top-1 accuracy of every head.

    Args:
        probe: trained heads.
        feats: feature name → ``(m, width)`` features.
        y: ``(m,)`` labels.

    Returns:
        Feature name → accuracy in ``[0, 1]``.
    """
    logits = probe({n: f.double() for n, f in feats.items()})
    return {n: (z.argmax(1) == y).double().mean().item() for n, z in logits.items()}


def labelled_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` samples of every class, drawn with ``seed``.

    Kept custom rather than scikit-learn's ``train_test_split(stratify=y)``: that one keeps class
    *proportions*, so on the digits training split (classes of unequal size) it does not give exactly
    ``per_class`` labels of every class, which is what the label regimes mean, and it would redraw every
    subset behind the published tables.

    Args:
        y: ``(n,)`` labels.
        per_class: labels per class; ``0`` = all samples.
        seed: seed of the draw.

    Returns:
        Sorted indices into ``y``.

    Raises:
        ValueError: a class has fewer than ``per_class`` samples.
    """
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
    """Held-out masks of ``k`` shuffled stratified folds (scikit-learn's ``StratifiedKFold``)."""
    from sklearn.model_selection import StratifiedKFold

    labels = y.cpu().numpy()
    splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels)
    masks = []
    for _, held in splits:
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[torch.from_numpy(held)] = True
        masks.append(mask)
    return masks


def select_weight_decay(feats: Mapping[str, torch.Tensor], y: torch.Tensor, num_classes: int,
                        grid: Sequence[float] = DEFAULT_WEIGHT_DECAYS, folds: int = 5, seed: int = 0,
                        max_iter: int = 100) -> dict[str, float]:
    """Per-feature ``λ`` by stratified k-fold cross-validation on the labelled samples only.

    With one label per class there is nothing to hold out; the largest grid value is returned (the
    strongest prior is the safe choice with ten samples). Folds are capped by the smallest class count.

    Args:
        feats: feature name → ``(n, width)`` labelled features.
        y: ``(n,)`` labels.
        num_classes: classes.
        grid: candidate ``λ`` values.
        folds: folds (at most the smallest class count are used).
        seed: seed of the fold assignment.
        max_iter: L-BFGS iterations per fit.

    Returns:
        Feature name → the ``λ`` with the best cross-validated accuracy (ties go to the larger ``λ``).
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
    """Ledoit–Wolf (2004) shrinkage and target scale of centred rows.

    Computed from the ``n × n`` Gram matrix, never the ``p × p`` covariance: ``Σ_ij S_ij² = ‖xc xcᵀ‖²_F / n²``
    and ``Σ_k ‖x_k‖⁴`` replace the covariance-sized terms, so the cost is ``O(n² p)``. Tested against
    :func:`sklearn.covariance.ledoit_wolf` with ``n < p`` and ``n > p``.

    Args:
        xc: ``(n, p)`` centred rows.

    Returns:
        The shrinkage ``s`` in ``[0, 1]`` and the target scale ``μ = tr(S) / p`` of the empirical
        covariance ``S = xcᵀ xc / n``. ``s = 0`` when ``S`` already equals ``μ I`` (including ``S = 0``).
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
    """Ledoit–Wolf shrunk covariance of centred rows (``p × p``; for tests and small ``p``).

    Args:
        xc: ``(n, p)`` centred rows.

    Returns:
        ``(1 - s) S + s μ I`` and the shrinkage ``s`` (see :func:`ledoit_wolf_shrinkage`).
    """
    shrink, mu = ledoit_wolf_shrinkage(xc)
    emp = xc.T @ xc / xc.shape[0]
    return (1 - shrink) * emp + shrink * mu * torch.eye(xc.shape[1], dtype=xc.dtype), shrink


@dataclass
class LDAProbe:
    """A fitted linear discriminant whose outputs are class log-posteriors.

    The discriminant is ``x Wᵀ + b``; calling the probe returns its log-softmax, the log-posterior under
    equal class priors. Every way :func:`fit_lda` fits (shrinkage LDA, nearest class mean, constant
    features) returns this one scale, so posteriors of probes on different features can be averaged.

    Args:
        weight: ``(classes, p)`` discriminant weights.
        bias: ``(classes,)`` discriminant offsets.
        shrinkage: Ledoit–Wolf shrinkage used (``1.0`` for nearest class mean).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    shrinkage: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Class log-posteriors.

        Args:
            x: ``(m, p)`` features, standardised like the fitted ones.

        Returns:
            ``(m, classes)`` float64 log-posteriors (each row's ``logsumexp`` is 0).
        """
        return torch.log_softmax(x.double() @ self.weight.T + self.bias, 1)


def _snap(x: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    # deviations at the rounding level of a mean are no variation: a constant column leaves ulp-sized
    # residuals that the scale-free discriminant would otherwise read as signal (weights of 1e30)
    return torch.where(x.abs() > tol, x, torch.zeros((), dtype=x.dtype))


def fit_lda(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> LDAProbe:
    """Shrinkage LDA with equal class priors (the labelled subsets are balanced).

    The covariance is the Ledoit–Wolf shrunk pooled within-class covariance ``Σ = a I + b xcᵀ xc``
    (``a = s μ``, ``b = (1 - s) / n``); the weights ``Σ⁻¹ M`` come from an ``n × n`` Woodbury solve when
    ``n < p``, from a ``p × p`` solve otherwise. Tested against scikit-learn's
    ``LinearDiscriminantAnalysis(solver="lsqr")`` with the same covariance.

    Degenerate inputs give a valid probe instead of an exception, so a sweep over many features goes on:

    * ``Σ`` singular (no shrinkage, ``a`` at rounding level, rank-deficient scatter): the weights are the
      minimum-norm solution ``Σ⁺ M``, from the pseudo-inverse of the residuals (``(xcᵀxc)⁺ = xc⁺ xc⁺ᵀ``,
      so the rank is decided on ``xc``, not on ``xcᵀxc`` whose condition number is its square). This is
      the solution scikit-learn's ``lsqr`` solver (``lstsq``) returns and it is the exact solve when ``Σ``
      is invertible. A jitter ``ε I`` would instead give directions without within-class scatter weights
      ``∝ 1/ε``: the posteriors' scale, which averaging across features reads, would be set by a constant,
      not by the data.
    * No within-class scatter (one sample per class, or every class constant): nearest class mean,
      the limit of full shrinkage, with ``Σ = σ² I`` and ``σ²`` the per-dimension variance of the labelled
      samples about their grand mean (an upper bound of the within-class variance, so the posterior is
      not overconfident and the log-posteriors do not change when the features are rescaled).
    * Constant features: zero weights, the uniform posterior (chance level).

    Args:
        x: ``(n, p)`` labelled features.
        y: ``(n,)`` labels in ``[0, num_classes)``.
        num_classes: classes.

    Returns:
        The fitted probe.

    Raises:
        ValueError: a class has no labelled sample.
    """
    x = x.double()
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ValueError(f"every class needs a labelled sample; counts per class: {counts.tolist()}")
    n, p = x.shape
    eps = torch.finfo(x.dtype).eps
    tol = n * eps * x.abs().amax(0)
    means = torch.zeros(num_classes, p, dtype=x.dtype).index_add_(0, y, x) / counts[:, None]
    xc = _snap(x - means[y], tol)
    if n <= num_classes or not bool(xc.any()):
        # the variance is estimated from the centred samples, so the posterior is scale-free like LDA's
        xt = _snap(x - x.mean(0), tol)
        var = float(xt.pow(2).sum()) / (n * p)
        weight = means / var if var > 0 else torch.zeros_like(means)
        return LDAProbe(weight, -0.5 * (means * weight).sum(1), 1.0)
    shrink, mu = ledoit_wolf_shrinkage(xc)
    a, b = shrink * mu, (1 - shrink) / n  # Σ = a I + b xcᵀ xc
    if b == 0:
        weight = means / a
    elif a <= eps * (a + b * float(xc.pow(2).sum())):  # a is below Σ's rounding: Σ is b xcᵀ xc, maybe singular
        pinv = torch.linalg.pinv(xc)  # (p, n)
        weight = (pinv @ (pinv.T @ means.T)).T / b
    elif n < p:  # Woodbury: Σ⁻¹ M = (M - xcᵀ (a/b I + xc xcᵀ)⁻¹ xc M) / a, an n × n solve
        inner = torch.linalg.solve(a / b * torch.eye(n, dtype=x.dtype) + xc @ xc.T, xc @ means.T)
        weight = ((means.T - xc.T @ inner) / a).T
    else:
        cov = a * torch.eye(p, dtype=x.dtype) + b * (xc.T @ xc)
        weight = torch.linalg.solve(cov, means.T).T
    bias = -0.5 * (means * weight).sum(1)
    return LDAProbe(weight, bias, shrink)


def fit_lda_probes(feats: Mapping[str, torch.Tensor], y: torch.Tensor, num_classes: int) -> dict[str, LDAProbe]:
    """One shrinkage-LDA head per feature; closed form, so one pass over the features fits them all.

    Args:
        feats: feature name → ``(n, width)`` labelled features.
        y: ``(n,)`` labels.
        num_classes: classes.

    Returns:
        Feature name → fitted probe (see :func:`fit_lda`).

    Raises:
        ValueError: a class has no labelled sample.
    """
    return {n: fit_lda(f, y, num_classes) for n, f in feats.items()}


@torch.no_grad()
def lda_accuracies(probes: Mapping[str, LDAProbe], feats: Mapping[str, torch.Tensor],
                   y: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of every LDA head.

    Args:
        probes: feature name → fitted probe.
        feats: feature name → ``(m, width)`` features.
        y: ``(m,)`` labels.

    Returns:
        Feature name → accuracy in ``[0, 1]``.
    """
    return {n: (p(feats[n]).argmax(1) == y).double().mean().item() for n, p in probes.items()}


class LinearProbeModule(FrozenFeatureModule):
    """A linear classifier on frozen diffusion features (layers × timesteps concatenated).

    Built on :class:`~heads.base.FrozenFeatureModule`: the backbone never trains, and features come
    online (``backbone``, ``layers``, ``timesteps``) or from a feature store (``store``, with a
    :class:`~difffeat.data.StoreDataModule`). Features are normalised by a non-affine batch norm
    (running statistics), the online counterpart of the standardisation used by :func:`probe_store`.

    Args:
        backbone: a registered name, a local diffusers folder or a cached hub id (online features).
        layers: tap names (or a filter on stored ones).
        timesteps: DDPM indices, 0 = least noise (or a filter on stored ones).
        readout: how each tap becomes a vector (default global average).
        ensemble: noise draws averaged per feature.
        num_classes: classes.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        store: a feature-store folder to read features from instead of a backbone.
    """

    def __init__(self, backbone: str | None = None, layers: list[str] | None = None,
                 timesteps: list[int] | None = None, readout: Readout | None = None, ensemble: int = 1,
                 num_classes: int = 10, lr: float = 1e-2, weight_decay: float = 1e-4,
                 store: str | None = None) -> None:
        super().__init__(backbone, layers, timesteps, readout=readout, ensemble=ensemble, store=store)
        dim = self._feature_dim(store)
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, num_classes)
        self.lr, self.weight_decay = lr, weight_decay
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def _feature_dim(self, store: str | None) -> int:
        if store is not None:
            shard = FeatureStore.open(store).read_shard(0, self.feature_names)
            return sum(shard[n][0].numel() for n in self.feature_names)
        backbone = self.extractor.backbone
        x = torch.zeros(1, backbone.image_channels, backbone.image_size, backbone.image_size)
        return self.vector({"image": x, "index": torch.zeros(1, dtype=torch.long)}).shape[1]

    def vector(self, batch: dict[str, Any]) -> torch.Tensor:
        """Concatenated, flattened features ``(B, D)`` of a batch."""
        feats = self.features(batch)
        return torch.cat([feats[n].flatten(1) for n in self.feature_names], 1)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits ``(B, classes)`` of a batch (``image`` and ``index``, or stored features)."""
        return self.head(self.norm(self.vector(batch)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Cross-entropy of the head on one batch.

        Args:
            batch: ``label`` and the images (``image``, ``index``) or the stored features.
            batch_idx: unused.

        Returns:
            The loss.
        """
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["label"])
        self.train_acc(logits, batch["label"])
        self.log_dict({"train/loss": loss, "train/acc": self.train_acc}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulates validation accuracy.

        Args:
            batch: as in :meth:`training_step`.
            batch_idx: unused.
        """
        self.val_acc(self(batch), batch["label"])
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the head only.

        Returns:
            The optimiser.
        """
        return torch.optim.AdamW(self.head_parameters(), lr=self.lr, weight_decay=self.weight_decay)


# ----------------------------------------------------------------------------- sweeps over stores
META = ("split", "label", "index")


def standardise(data: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Store tensors → features standardised with unlabelled train statistics, labels, train mask.

    Args:
        data: ``label`` and ``split`` (0 = train, 1 = test) per sample; every other tensor but ``index``
            is a feature (flattened).

    Returns:
        Feature name → ``(n, width)`` float64 standardised features, ``(n,)`` labels, ``(n,)`` train mask.

    Raises:
        KeyError: ``label`` or ``split`` is missing.
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

    Args:
        feats: feature name → ``(n, width)`` standardised features.
        y: ``(n,)`` labels.
        train: ``(n,)`` train mask; the test samples are never read.
        per_class: labels per class (``0`` = all).
        seeds: labelled-subset seeds.
        num_classes: classes (default ``max(y) + 1``).
        split_seeds: seeds of the held-out thirds.

    Returns:
        The best feature name and every feature's mean validation accuracy.
    """
    num_classes = num_classes or int(y.max()) + 1
    idx = train.nonzero().flatten()
    scores = dict.fromkeys(feats, 0.0)
    runs = [(s, seed) for s in split_seeds for seed in (seeds if per_class else list(seeds)[:1])]
    for split_seed, seed in runs:
        # custom, not train_test_split(stratify=...): another draw would change which taps the published
        # tables report as chosen
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
    """Test accuracy of averaging the class posteriors of LDA probes on several features.

    The probes return log-posteriors, so every feature weighs as much as its evidence, whatever the
    scale or width of its numbers; a constant feature adds the uniform posterior.

    Args:
        feats: feature name → ``(n, width)`` standardised features.
        names: the features whose posteriors are averaged.
        y: ``(n,)`` labels.
        train: ``(n,)`` train mask.
        per_class: labels per class (``0`` = all, run once).
        seeds: labelled-subset seeds.
        num_classes: classes (default ``max(y) + 1``).

    Returns:
        Test accuracy per seed.
    """
    num_classes = num_classes or int(y.max()) + 1
    test, tr_idx = ~train, train.nonzero().flatten()
    accs = []
    for seed in seeds if per_class else list(seeds)[:1]:
        pick = tr_idx[labelled_subset(y[tr_idx], per_class, seed)]
        probes = fit_lda_probes({n: feats[n][pick] for n in names}, y[pick], num_classes)
        posterior = sum(probes[n](feats[n][test]).exp() for n in names)
        accs.append((posterior.argmax(1) == y[test]).double().mean().item())
    return accs


def probe_sweep(feats: Mapping[str, torch.Tensor], y: torch.Tensor, train: torch.Tensor,
                regimes: Sequence[int], seeds: Sequence[int],
                num_classes: int | None = None) -> dict[str, dict[int, list[float]]]:
    """Test accuracy of an LDA probe on every feature, per label regime (0 = all labels) and seed.

    All heads of one (regime, seed) are fitted in one pass. The all-labels regime is deterministic and
    run once.

    Args:
        feats: feature name → ``(n, width)`` standardised features.
        y: ``(n,)`` labels.
        train: ``(n,)`` train mask.
        regimes: labels per class (``0`` = all labels).
        seeds: labelled-subset seeds.
        num_classes: classes (default ``max(y) + 1``).

    Returns:
        Feature name → regime → test accuracy per seed.
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
    """Accuracies as a percentage, ``mean ± std`` when there are several.

    Args:
        values: accuracies in ``[0, 1]``.

    Returns:
        E.g. ``"93.4 ± 0.7"`` (population std), or ``"99.1"`` for one value.
    """
    v = torch.tensor(values, dtype=torch.float64) * 100
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(unbiased=False):.1f}"


def probe_store(store: str, regimes: Sequence[int] = (1, 5, 10, 0), seeds: Sequence[int] = (0, 1, 2)) -> str:
    """LDA probe sweep over every feature of a feature store (``difffeat probe --store``).

    Args:
        store: the store folder; besides the features its shards need ``label`` and ``split``
            (0 = train, 1 = test) per sample.
        regimes: labels per class (``0`` = all labels).
        seeds: labelled-subset seeds.

    Returns:
        A Markdown table, one row per feature, one column per regime.

    Raises:
        StoreError: the store has no ``label`` or ``split`` tensor (checked on the first shard before
            anything is loaded), or a shard is missing or corrupt.
        FileNotFoundError: ``store`` is not a feature store.
    """
    from difffeat.store import FeatureStore, StoreError

    fs = FeatureStore.open(store)
    if fs.shard_path(0).exists():  # else load() names the missing shards
        held = fs.names()
        missing = [k for k in ("label", "split") if k not in held]
        if missing:
            raise StoreError(f"{fs.root} cannot be probed: it has no {' or '.join(map(repr, missing))} tensor "
                             f"(probing needs a class label and a train/test split, 0 = train, 1 = test, per "
                             f"sample beside the features); it holds {held}. Extract from a dataset whose "
                             f"items carry 'label' and 'split'")
    feats, y, train = standardise(fs.load())
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
        """Cross-entropy on one batch.

        Args:
            batch: ``image`` and ``label``.
            batch_idx: unused.

        Returns:
            The loss.
        """
        loss = F.cross_entropy(self.model(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulates validation accuracy.

        Args:
            batch: ``image`` and ``label``.
            batch_idx: unused.
        """
        self.val_acc(self.model(batch["image"]), batch["label"])
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with a per-step cosine decay to 0.

        Returns:
            Lightning's optimiser / scheduler dict.
        """
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(int(self.trainer.estimated_stepping_batches), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        """Writes the weights to ``export_path`` (rank 0 only), if one was given."""
        if self.export_path and self.trainer.is_global_zero:
            from pathlib import Path

            from safetensors.torch import save

            from difffeat.store import atomic_write

            Path(self.export_path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.export_path, save({k: v.detach().cpu().contiguous()
                                                 for k, v in self.model.state_dict().items()}))
