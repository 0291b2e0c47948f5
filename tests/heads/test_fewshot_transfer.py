"""The training-free label-transfer baseline: k-NN votes, their memory bound, input checks, its module."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

from heads.fewshot import FewShotIoU
from heads.fewshot_transfer import (
    LabelTransferFewShotModule,
    LabelTransferSegmenter,
    knn_vote,
    normalise_taps,
    support_labels,
)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_knn_vote_equals_sklearn_brute_force_cosine_neighbours(k) -> None:
    g = torch.Generator().manual_seed(k)
    query, support = torch.randn(60, 7, generator=g), torch.randn(90, 7, generator=g)
    labels = torch.rand(90, generator=g) < 0.4
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(support.numpy())
    idx = nn.kneighbors(query.numpy(), return_distance=False)
    expected = labels.numpy()[idx].mean(1)
    for block in (1, 7 * 90 + 3, 10**9):  # one query row per block, ragged blocks, everything at once
        votes = knn_vote(query, support, labels, k, block_elements=block)
        np.testing.assert_allclose(votes.numpy(), expected, rtol=0, atol=1e-7)
    assert 0 < expected.mean() < 1  # the labels are mixed: the comparison is not trivially all-0 or all-1


def test_knn_vote_keeps_its_similarity_blocks_within_the_bound() -> None:
    # a 64x64 query grid against 5 shots of 64x64: the whole matrix would be 4096 x 20480 floats (320 MiB)
    query, support = torch.randn(64 * 64, 8), torch.randn(5 * 64 * 64, 8)
    labels = torch.zeros(len(support), dtype=torch.bool)
    block = 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        knn_vote(query, support, labels, 3, block_elements=block)
    mm = [e.cpu_memory_usage for e in prof.events() if e.name in ("aten::mm", "aten::matmul")]
    assert mm and max(mm) <= 4 * block  # float32 similarities of one block
    assert max(mm) == 4 * (block // len(support)) * len(support)  # and the blocks are as large as allowed


def _one_hot(layout: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(layout, classes).permute(2, 0, 1).float()


@pytest.mark.parametrize("shots", [1, 5])
def test_transfer_is_perfect_when_features_are_one_hot_class_codes(shots) -> None:
    g = torch.Generator().manual_seed(shots)
    classes = 4

    def layout() -> torch.Tensor:  # 4x4 blocks of random classes, every class present on >= 16 pixels
        while True:
            lay = torch.randint(classes, (4, 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
            if len(lay.unique()) == classes:
                return lay

    supports = [layout() for _ in range(shots)]
    query = layout()
    model = LabelTransferSegmenter(lambda x: x, k=10)  # the features are the image: one-hot class codes
    for c in range(classes):
        support = torch.stack([_one_hot(s, classes) for s in supports])
        masks = torch.stack([s == c for s in supports])
        pred = model.predict(support[None], masks[None], _one_hot(query, classes)[None])[0]
        assert torch.equal(pred, query == c)


def test_tap_normalisation_makes_the_cosine_a_mean_of_per_tap_cosines() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=g), torch.randn(2, 5, generator=g) * 100  # the second tap is far larger
    x = normalise_taps(torch.cat([a, b], 1), [3, 5])
    per_tap = (F.cosine_similarity(a[0], a[1], 0) + F.cosine_similarity(b[0], b[1], 0)) / 2
    assert torch.isclose(x[0] @ x[1], per_tap, atol=1e-6)
    assert torch.allclose(x.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="sum to 7"):
        normalise_taps(torch.cat([a, b], 1), [3, 4])


def test_a_support_mask_lost_at_the_feature_grid_is_refused_by_name() -> None:
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True
    masks[1, 0, 0] = True  # one pixel: 1/16 of a 4x4 cell
    with pytest.raises(ValueError, match=r"episode 7: .*shot 1 \(1 px\).* 4x4 feature resolution"):
        support_labels(masks, (4, 4), episode=7)
    assert support_labels(masks, (16, 16)).equal(masks)  # at the image's own grid nothing is lost
    model = LabelTransferSegmenter(lambda x: F.avg_pool2d(x, 4), k=1)
    with pytest.raises(ValueError, match="shot 1"):
        model(torch.rand(2, 3, 16, 16), masks, torch.rand(1, 3, 16, 16))
    half = torch.zeros(1, 16, 16, dtype=torch.bool)
    half[0, :2, :4] = True  # exactly half of one cell: kept
    assert support_labels(half, (4, 4)).sum() == 1


def test_bad_shots_fail_before_any_feature_is_computed() -> None:
    calls: list[int] = []
    model = LabelTransferSegmenter(lambda x: calls.append(len(x)) or x, k=1)
    query = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"episode 3: shots of mixed sizes: images \[\(16, 16\), \(12, 12\)\]"):
        model([torch.rand(3, 16, 16), torch.rand(3, 12, 12)],
              [torch.ones(16, 16, dtype=torch.bool), torch.ones(12, 12, dtype=torch.bool)], query, episode=3)
    with pytest.raises(ValueError, match=r"\[0\] are empty"):
        model(torch.rand(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.bool), query)
    assert calls == []
    with pytest.raises(ValueError, match="k=300 neighbours"):
        LabelTransferSegmenter(lambda x: x[:, :, :4, :4], k=300)(torch.rand(1, 3, 16, 16),
                                                                  torch.ones(1, 16, 16, dtype=torch.bool), query)
    # a list of same-size shots is stacked and runs
    out = model([torch.rand(3, 16, 16)] * 2, [torch.ones(16, 16, dtype=torch.bool)] * 2, query)
    assert out.shape == (1, 16, 16) and torch.all(out == 1)


def test_queries_of_another_size_than_the_supports() -> None:
    def features(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(8, 8), mode="area")

    s = torch.zeros(1, 2, 16, 16)
    s[:, 0], s[:, 1, :8] = 1, 1  # channel 1 on the top half
    s[:, 0, :8] = 0
    q = torch.zeros(1, 2, 24, 24)
    q[:, 0], q[:, 1, 12:] = 1, 1  # channel 1 on the bottom half
    q[:, 0, 12:] = 0
    pred = LabelTransferSegmenter(features, k=3).predict(s[None], s[:, 1].bool()[None], q)
    assert pred.shape == (1, 24, 24) and torch.equal(pred[0], q[0, 1].bool())


def test_module_scores_the_protocol_on_the_prototype_baselines_features() -> None:
    from difffeat.data.episodes import FewShotDataModule
    from heads.fewshot_prototype import PrototypeFewShotModule

    module = LabelTransferFewShotModule(backbone="unet2d-tiny", layers=["up_blocks.0"], feature_size=16, k=5)
    assert not [n for n, p in module.named_parameters() if p.requires_grad]
    proto = PrototypeFewShotModule(backbone="unet2d-tiny", layers=["up_blocks.0"], feature_size=16)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(module.model.features(images), proto.model.features(images))  # the same features
    data = FewShotDataModule(fold=0, train_scenes=40, test_scenes=60, test_episodes=3, batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.test(module, data, verbose=False)[0]
    expected = FewShotIoU(20)
    for batch in data.test_dataloader():
        expected.update(module.predict_masks(batch), batch["query_mask"], batch["class_id"], batch["query_ignore"])
    assert logged["test/miou"] == pytest.approx(float(expected.compute()["miou"]), abs=1e-6)
    batch = next(iter(data.test_dataloader()))
    batch["negative"] = torch.tensor([False, True, False])
    with pytest.raises(ValueError, match=r"negative episodes \[1\] reached evaluation"):
        module.predict_masks(batch)
