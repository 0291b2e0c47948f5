"""Linear probes: the multi-head sweep, λ selection, and the online probe with a frozen backbone."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from difffeat.data import DigitsDataModule
from heads.classification import (
    LinearProbeModule,
    _folds,
    fit_lda,
    fit_linear_probes,
    labelled_subset,
    ledoit_wolf,
    ledoit_wolf_shrinkage,
    probe_accuracies,
    probe_ensemble,
    probe_store,
    probe_sweep,
    select_by_validation,
    select_weight_decay,
    standardise,
)


def _blobs(n=200, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.randn(3, d, generator=gen) * 4
    return centres[y] + torch.randn(n, d, generator=gen), y


def test_one_pass_trains_every_head_independently() -> None:
    x, y = _blobs()
    noise = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    probe = fit_linear_probes({"good": x, "noise": noise}, y, 3, weight_decay=1e-3)
    acc = probe_accuracies(probe, {"good": x, "noise": noise}, y)
    assert acc["good"] > 0.95 and acc["noise"] < 0.7
    alone = fit_linear_probes({"good": x}, y, 3, weight_decay=1e-3)
    torch.testing.assert_close(alone.heads["good"].weight, probe.heads["good"].weight, rtol=1e-3, atol=1e-3)


def test_labelled_subset_is_stratified_and_seeded() -> None:
    y = torch.arange(100) % 10
    a = labelled_subset(y, 3, seed=0)
    assert torch.equal(torch.bincount(y[a]), torch.full((10,), 3))
    assert torch.equal(a, labelled_subset(y, 3, seed=0))
    assert not torch.equal(a, labelled_subset(y, 3, seed=1))
    assert len(labelled_subset(y, 0, seed=0)) == 100
    with pytest.raises(ValueError, match="fewer than 11"):
        labelled_subset(y, 11, seed=0)


def test_weight_decay_selection_uses_cross_validation() -> None:
    # the class signal hides under a large noise shared by both dims: only a weakly penalised
    # classifier learns to subtract dim 1 from dim 0; a heavy penalty leaves a mean-difference classifier
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    shared = torch.randn(90, generator=gen) * 5
    x = torch.stack([y.float() + shared + 0.05 * torch.randn(90, generator=gen), shared], 1)
    lam = select_weight_decay({"f": x}, y, 3, grid=(1e-3, 10.0))
    assert lam["f"] == 1e-3
    one = labelled_subset(y, 1, 0)
    assert select_weight_decay({"f": x[one]}, y[one], 3, grid=(1e-3, 10.0))["f"] == 10.0


def test_online_probe_leaves_the_backbone_untouched() -> None:
    L.seed_everything(0)
    module = LinearProbeModule("unet2d-tiny", ["mid_block"], [10], num_classes=10, lr=0.05)
    state = {k: v.clone() for k, v in module.extractor.backbone.state_dict().items()}
    head = module.head.weight.clone()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    after = module.extractor.backbone.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # weights and buffers (norm statistics)
    assert not module.extractor.backbone.training
    assert not torch.equal(head, module.head.weight)
    assert not any(p.requires_grad for p in module.extractor.backbone.parameters())


def test_ledoit_wolf_matches_scikit_learn() -> None:
    from sklearn.covariance import ledoit_wolf as reference

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64) @ mix
    xc = x - x.mean(0)
    cov, shrink = ledoit_wolf(xc)
    ref_cov, ref_shrink = reference(xc.numpy(), assume_centered=True)
    assert abs(shrink - ref_shrink) < 1e-10
    torch.testing.assert_close(cov, torch.from_numpy(ref_cov))


def test_lda_separates_correlated_classes_and_degrades_to_nearest_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3000) % 3
    shared = torch.randn(3000, generator=gen) * 5
    x = torch.stack([y.float() + shared + 0.05 * torch.randn(3000, generator=gen), shared], 1)
    probe = fit_lda(x[:1500], y[:1500], 3)  # enough samples for a small shrinkage
    assert probe.shrinkage < 0.01
    assert (probe(x[1500:]).argmax(1) == y[1500:]).double().mean() > 0.95
    one = labelled_subset(y, 1, 0)
    nearest = fit_lda(x[one], y[one], 3)
    assert nearest.shrinkage == 1.0
    dists = torch.cdist(x.double(), x[one].double())
    assert torch.equal(nearest(x).argmax(1), y[one][dists.argmin(1)])


def test_probe_store_table(tmp_path) -> None:
    from difffeat.store import FeatureStore

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    good = torch.nn.functional.one_hot(y, 3).double() * 3 + torch.randn(60, 3, generator=gen, dtype=torch.float64)
    fs = FeatureStore(tmp_path, {"test": 1}, 60, 60)
    fs.write_shard(0, {"good@t1": good.float(), "noise@t1": torch.randn(60, 3, generator=gen),
                       "label": y, "split": (torch.arange(60) >= 40).long(), "index": torch.arange(60)})
    feats, labels, train = standardise(fs.load())
    assert set(feats) == {"good@t1", "noise@t1"} and int(train.sum()) == 40
    chosen, scores = select_by_validation(feats, labels, train, per_class=3, seeds=[0, 1])
    assert chosen == "good@t1" and scores["good@t1"] > scores["noise@t1"]
    both = probe_ensemble(feats, ["good@t1", "noise@t1"], labels, train, per_class=3, seeds=[0, 1])
    alone = probe_ensemble(feats, ["noise@t1"], labels, train, per_class=3, seeds=[0, 1])
    assert len(both) == 2 and min(both) > max(alone)
    table = probe_store(str(tmp_path), regimes=(1, 0), seeds=(0, 1))
    lines = table.splitlines()
    assert lines[0] == "| feature | 1 / class | all labels |"
    good_row = next(line for line in lines if "good@t1" in line)
    assert float(good_row.split("|")[3]) > 90


def test_lda_woodbury_path_equals_the_direct_solve() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(30) % 3
    x = torch.randn(30, 50, generator=gen, dtype=torch.float64) + torch.nn.functional.one_hot(y, 50).double()
    probe = fit_lda(x, y, 3)  # n = 30 < p = 50: the n × n path
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    cov, shrink = ledoit_wolf(x - means[y])
    assert 0 < shrink < 1 and abs(probe.shrinkage - shrink) < 1e-12
    torch.testing.assert_close(probe.weight, torch.linalg.solve(cov, means.T).T)


def _two_taps(n=300, seed=0):
    """An informative tap and a weak one, balanced classes, first 150 samples train."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    good = torch.nn.functional.one_hot(y, 3).double() * 2 + torch.randn(n, 3, generator=gen, dtype=torch.float64)
    weak = torch.nn.functional.one_hot(y, 3).double() * 0.3 + torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return good, weak, y, torch.arange(n) < 150


def test_lda_on_constant_and_degenerate_taps_gives_a_valid_probe() -> None:
    y = torch.arange(30) % 3
    uniform = torch.full((30, 3), -math.log(3), dtype=torch.float64)
    for const in (torch.zeros(30, 8), torch.full((30, 8), 0.7), torch.full((30, 80), 123.456)):
        probe = fit_lda(const, y, 3)  # 10 per class: the shrinkage-LDA path
        torch.testing.assert_close(probe(const), uniform)
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    # every class constant (only rounding-level residuals): nearest class mean, not weights of 1e30
    flat = fit_lda(means[y], y, 3)
    assert torch.equal(flat(means).argmax(1), torch.arange(3)) and flat.weight.abs().max() < 1e3
    # rank-one residuals of equal norm (n < p): Ledoit–Wolf shrinks nothing and Σ is singular
    y6 = torch.arange(6) % 3
    sign = torch.tensor([1.0, 1, 1, -1, -1, -1], dtype=torch.float64)
    x = means[y6] + sign[:, None] * torch.randn(8, generator=gen, dtype=torch.float64)
    probe = fit_lda(x, y6, 3)
    assert probe.shrinkage < 1e-12 and probe.weight.abs().max() < 1e6
    assert torch.equal(probe(means).argmax(1), torch.arange(3)) and torch.isfinite(probe(x)).all()
    # duplicated columns with n < p
    dup = torch.randn(6, 4, generator=gen, dtype=torch.float64) + means[y6, :4] * 3
    probe = fit_lda(torch.cat([dup, dup, dup], 1), y6, 3)
    assert torch.isfinite(probe(torch.cat([dup, dup, dup], 1))).all()


def test_sweep_goes_on_past_a_constant_tap() -> None:
    good, _, y, train = _two_taps()
    feats = {"good": good, "zero": torch.zeros_like(good), "const": torch.full_like(good, 0.7)}
    acc = probe_sweep(feats, y, train, regimes=(1, 5, 0), seeds=(0, 1))
    assert set(acc) == set(feats) and acc["good"][5][0] > 0.8
    for name in ("zero", "const"):  # uniform posterior → argmax 0 → a third of balanced classes
        assert all(abs(a - 1 / 3) < 1e-12 for per in acc[name].values() for a in per)


@pytest.mark.parametrize(("n", "p"), [(3, 50), (6, 500), (30, 200), (300, 20), (600, 5)])
def test_lda_log_posteriors_do_not_depend_on_the_feature_scale(n, p) -> None:
    # (3, 50): one label per class, nearest class mean; (300, 20): full shrinkage; (6, 500) / (30, 200):
    # Woodbury; (600, 5): the direct solve
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randn(n, p, generator=gen, dtype=torch.float64) + torch.randn(3, p, generator=gen, dtype=torch.float64)[y]
    test = torch.randn(50, p, generator=gen, dtype=torch.float64)
    logp = fit_lda(x, y, 3)(test)
    torch.testing.assert_close(torch.logsumexp(logp, 1), torch.zeros(50, dtype=torch.float64))
    for scale in (1e-3, 1e3):
        torch.testing.assert_close(fit_lda(x * scale, y, 3)(test * scale), logp, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("per_class", [1, 5])
def test_ensemble_is_not_dominated_by_a_wide_or_constant_tap(per_class) -> None:
    good, weak, y, train = _two_taps()
    seeds = [0, 1, 2]
    both = probe_ensemble({"good": good, "weak": weak}, ["good", "weak"], y, train, per_class, seeds)
    wide = probe_ensemble({"good": good, "weak": weak * 1e3}, ["good", "weak"], y, train, per_class, seeds)
    weak_alone = probe_ensemble({"weak": weak}, ["weak"], y, train, per_class, seeds)
    assert wide == both and sum(both) > sum(weak_alone)
    good_alone = probe_ensemble({"good": good}, ["good"], y, train, per_class, seeds)
    with_zero = probe_ensemble({"good": good, "zero": torch.zeros_like(good)}, ["good", "zero"], y, train,
                               per_class, seeds)
    assert with_zero == good_alone


def test_probe_store_names_the_missing_tensors_before_loading(tmp_path, monkeypatch) -> None:
    from difffeat.store import FeatureStore, StoreError

    for kept in ({"split"}, {"label"}, set()):
        root = tmp_path / f"store-{'-'.join(sorted(kept)) or 'bare'}"
        fs = FeatureStore(root, {"test": 2}, 6, 6)
        extra = {"label": torch.arange(6) % 3, "split": torch.zeros(6, dtype=torch.long)}
        fs.write_shard(0, {"feat@t1": torch.randn(6, 4), "index": torch.arange(6),
                           **{k: v for k, v in extra.items() if k in kept}})
        with monkeypatch.context() as m:
            m.setattr(FeatureStore, "load", lambda *a, **k: pytest.fail("loaded the store before checking it"))
            with pytest.raises(StoreError) as err:
                probe_store(str(root))
        msg = str(err.value)
        assert str(root) in msg and "feat@t1" in msg
        for name in ("label", "split"):
            assert (f"'{name}'" in msg.split("it holds")[0]) == (name not in kept)


@pytest.mark.parametrize(("n", "p"), [(40, 120), (400, 30)])
def test_lda_matches_scikit_learn(n, p) -> None:
    from sklearn.covariance import ShrunkCovariance
    from sklearn.covariance import ledoit_wolf as reference
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    gen = torch.Generator().manual_seed(1)
    y, y_test = torch.arange(n) % 4, torch.arange(4000) % 4
    mix = torch.randn(p, p, generator=gen, dtype=torch.float64) / p**0.5
    centres = torch.randn(4, p, generator=gen, dtype=torch.float64) * 0.4
    x = torch.randn(n, p, generator=gen, dtype=torch.float64) @ mix + centres[y]
    x_test = torch.randn(4000, p, generator=gen, dtype=torch.float64) @ mix + centres[y_test]
    probe = fit_lda(x, y, 4)
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    _, ref_shrink = reference((x - means[y]).numpy(), assume_centered=True)
    assert 0 < ref_shrink < 1 and abs(probe.shrinkage - ref_shrink) <= 1e-6 * ref_shrink
    ours = probe(x_test).argmax(1).numpy()
    # the same estimator: sklearn's prior-weighted per-class covariances, each shrunk by s towards its
    # own tr/p, sum to our shrunk pooled covariance
    same = LinearDiscriminantAnalysis(solver="lsqr", covariance_estimator=ShrunkCovariance(shrinkage=ref_shrink))
    assert (ours == same.fit(x.numpy(), y.numpy()).predict(x_test.numpy())).mean() >= 0.99
    # shrinkage="auto" is another estimator (Ledoit–Wolf per class on per-class standardised features,
    # so shrinking towards each class's own variances): argmax agrees on ~97-99 % here, so only the
    # accuracy is compared
    auto = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x.numpy(), y.numpy())
    assert (ours == y_test.numpy()).mean() >= (auto.predict(x_test.numpy()) == y_test.numpy()).mean() - 0.01


@pytest.mark.parametrize(("n", "p"), [(30, 200), (300, 20)])
def test_ledoit_wolf_shrinkage_matches_scikit_learn(n, p) -> None:
    from sklearn.covariance import ledoit_wolf as reference

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, p, generator=gen, dtype=torch.float64) @ torch.randn(p, p, generator=gen, dtype=torch.float64)
    xc = x - x.mean(0)
    shrink, mu = ledoit_wolf_shrinkage(xc)
    ref_cov, ref_shrink = reference(xc.numpy(), assume_centered=True)
    assert abs(shrink - ref_shrink) <= 1e-6 * ref_shrink
    assert abs(mu - float(torch.trace(xc.T @ xc)) / (n * p)) <= 1e-9 * mu
    torch.testing.assert_close(ledoit_wolf(xc)[0], torch.from_numpy(ref_cov))


def test_folds_are_stratified_seeded_and_cover_every_sample() -> None:
    y = torch.cat([torch.zeros(23), torch.ones(17), torch.full((11,), 2)]).long()
    folds = _folds(y, 5, seed=0)
    assert torch.equal(torch.stack(folds).sum(0), torch.ones(len(y), dtype=torch.long))
    for held in folds:
        counts = torch.bincount(y[held], minlength=3)
        assert torch.all((counts - torch.tensor([23, 17, 11]) / 5).abs() < 1)
    assert all(torch.equal(a, b) for a, b in zip(folds, _folds(y, 5, seed=0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(folds, _folds(y, 5, seed=1), strict=True))
