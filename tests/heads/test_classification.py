"""Linear probes: the multi-head sweep, λ selection, and the online probe with a frozen backbone."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from difffeat.data import DigitsDataModule
from heads.classification import (
    LinearProbeModule,
    fit_lda,
    fit_linear_probes,
    labelled_subset,
    ledoit_wolf,
    probe_accuracies,
    probe_ensemble,
    probe_store,
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
