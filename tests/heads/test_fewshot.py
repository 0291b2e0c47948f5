"""Few-shot segmentation, shared parts: the episodic metric, k-shot merging, the feature cache, episodes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difffeat.backbones import create_backbone
from difffeat.data.episodes import FewShotEpisodes
from difffeat.data.scenes import SceneDataset
from difffeat.extract import FeatureExtractor
from difffeat.readout import PerPixel
from heads.fewshot import FeatureCache, FewShotIoU, dense_features, episode_masks, shot_vote


def _mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in r] for r in rows])


def test_metric_sums_per_class_over_episodes_before_dividing() -> None:
    metric = FewShotIoU(num_classes=3)
    # class 0, episode 1: pred 2 px, target 2 px, overlap 1 -> I=1, U=3 (bg: I=1, U=3 on 4 px)
    metric.update(_mask(["##", ".."])[None], _mask(["#.", "#."])[None], torch.tensor([0]))
    # class 0, episode 2: perfect 1 px -> I=1, U=1 (bg: I=3, U=3)
    metric.update(_mask(["#.", ".."])[None], _mask(["#.", ".."])[None], torch.tensor([0]))
    # class 2: pred empty, target 1 px -> I=0, U=1 (bg: I=3, U=4)
    metric.update(_mask(["..", ".."])[None], _mask(["..", ".#"])[None], torch.tensor([2]))
    out = metric.compute()
    # class 0: (1+1)/(3+1) = 0.5 (a mean of per-episode IoUs would give (1/3 + 1)/2 = 0.667); class 2: 0
    assert torch.isclose(out["miou"], torch.tensor(0.25, dtype=torch.float64))
    fg = (1 + 1 + 0) / (3 + 1 + 1)
    bg = (1 + 3 + 3) / (3 + 3 + 4)
    assert torch.isclose(out["fbiou"], torch.tensor((fg + bg) / 2, dtype=torch.float64))


def test_metric_ignores_marked_pixels() -> None:
    metric = FewShotIoU(num_classes=1)
    pred, target = _mask(["##"])[None], _mask(["#."])[None]
    metric.update(pred, target, torch.tensor([0]), ignore=_mask([".#"])[None])
    assert metric.compute()["miou"] == 1
    with pytest.raises(ValueError, match="1 ignored pixels are foreground"):
        metric.update(pred, target, torch.tensor([0]), ignore=_mask(["#."])[None])


def test_shot_vote_keeps_pixels_of_at_least_half_the_top_count() -> None:
    votes = torch.stack([_mask(["#."]), _mask(["##"]), _mask(["#."])])
    assert torch.equal(shot_vote(votes), _mask(["#."]))  # 3/3 and 1/3


def test_episodes_are_seeded_and_exclude_the_query() -> None:
    scenes = SceneDataset(length=40, size=64, classes=[0, 1, 2])
    episodes = FewShotEpisodes(scenes, [0, 1, 2], shots=2, episodes=10, seed=5)
    for e in range(10):
        c, query, supports = episodes.sample(e)
        assert query not in supports and len(set(supports)) == 2
        item = episodes[e]
        assert item["class_id"] == c
        assert item["query_mask"].any() and all(m.any() for m in item["support_mask"])
        assert item["support"].shape == (2, 3, 64, 64) and not item["query_ignore"].any()  # scenes ignore nothing
    assert episodes.sample(3) == FewShotEpisodes(scenes, [0, 1, 2], shots=2, episodes=10, seed=5).sample(3)


def test_episode_sampler_bad_input() -> None:
    scenes = SceneDataset(length=6, size=64, classes=[0, 1])
    with pytest.raises(ValueError, match="at least one support"):
        FewShotEpisodes(scenes, [0, 1], shots=0)
    with pytest.raises(ValueError, match="fewer than shots \\+ 1 = 6 images"):
        FewShotEpisodes(scenes, [0, 1], shots=5)


def test_fewshot_datamodule_keeps_novel_classes_out_of_training() -> None:
    from difffeat.data.episodes import FewShotDataModule

    dm = FewShotDataModule(fold=1, train_scenes=60, test_scenes=150, train_episodes=6, test_episodes=6)
    assert set(dm.novel) == {5, 6, 7, 8, 9} and not set(dm.novel) & set(dm.base)
    train = dm.episodes(True)
    assert all(set(train.dataset[i]["labels"].tolist()) <= set(dm.base) for i in range(60))
    assert {train[e]["class_id"] for e in range(6)} <= set(dm.base)
    assert {dm.episodes(False)[e]["class_id"] for e in range(6)} <= set(dm.novel)


def test_feature_cache_computes_each_image_once_whatever_the_batch() -> None:
    calls: list[int] = []
    extractor = FeatureExtractor(create_backbone("unet2d-tiny"), ["up_blocks.0"], [300], readout=PerPixel(4),
                                 noise="content")

    def features(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return dense_features(extractor)(images)

    a, b, c = (torch.rand(3, 1, 16, 16) * 2 - 1).unbind()
    cache = FeatureCache(features)
    first = cache(torch.stack([a, b, a]))
    assert calls == [2] and torch.equal(first[0], first[2])
    again = cache(torch.stack([c, b]))  # b reused, only c computed
    assert calls == [2, 1] and torch.equal(again[1], first[1]) and len(cache) == 3
    # the noise follows the image, not its batch position: a fresh cache, b first
    assert torch.equal(FeatureCache(features)(torch.stack([b, a]))[0], first[1])


def test_episode_masks_native_and_per_shot_vote() -> None:
    seen: list[int] = []

    def predict(support, support_mask, query):  # predicts the support masks' union
        seen.append(support.shape[1])
        return support_mask.any(1)

    support = torch.zeros(1, 3, 1, 1, 3)
    masks = torch.stack([_mask(["#.."]), _mask(["##."]), _mask(["#.#"])])[None]
    query = torch.zeros(1, 1, 1, 3)
    assert torch.equal(episode_masks(predict, support, masks, query), _mask(["###"])[None])
    assert seen == [3]
    # vote: per-pixel counts 3, 1, 1 of max 3 -> only the first pixel survives the 0.5 threshold
    assert torch.equal(episode_masks(predict, support, masks, query, vote=True), _mask(["#.."])[None])
    assert seen == [3, 1, 1, 1]


def test_negative_episodes_never_reach_the_metric() -> None:
    from heads.fewshot import FewShotModule

    class Everything(FewShotModule):
        def __init__(self) -> None:
            super().__init__(num_classes=4)
            self.model = nn.Identity()

        def predict_masks(self, batch):
            return torch.ones_like(batch["query_mask"])

    batch = {"query_mask": torch.ones(2, 4, 4, dtype=torch.bool), "class_id": torch.tensor([1, 2]),
             "episode": torch.tensor([7, 8]), "negative": torch.tensor([False, True])}
    module = Everything()
    for step in (module.validation_step, module.test_step):
        with pytest.raises(ValueError, match=r"negative episodes \[8\] reached evaluation"):
            step(batch, 0)
    batch["negative"] = torch.tensor([False, False])
    module.test_step(batch, 0)
    assert module.test_iou.compute()["miou"] > 0
