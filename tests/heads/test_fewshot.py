"""Few-shot segmentation: the episodic metric, the prototype baseline, the episode sampler."""

from __future__ import annotations

import pytest
import torch

from difffeat.data.episodes import FewShotEpisodes
from difffeat.data.scenes import SceneDataset
from heads.fewshot import FewShotIoU, PrototypeSegmenter, masked_average, shot_vote


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


def test_masked_average_and_shot_vote() -> None:
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :2, :2] = True  # the top-left feature cell
    assert masked_average(feats, mask).item() == 0.0
    votes = torch.stack([_mask(["#."]), _mask(["##"]), _mask(["#."])])
    assert torch.equal(shot_vote(votes), _mask(["#."]))  # 3/3 and 1/3


def test_prototypes_segment_by_feature_similarity() -> None:
    # features = the image itself: red objects on a blue background
    def image(box):
        x = torch.zeros(3, 16, 16)
        x[2] = 1
        y0, y1, x0, x1 = box
        x[:, y0:y1, x0:x1] = torch.tensor([1.0, 0, 0])[:, None, None]
        m = torch.zeros(16, 16, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        return x, m

    (s, sm), (q, qm) = image((2, 8, 2, 8)), image((9, 15, 5, 12))
    model = PrototypeSegmenter(lambda x: x)
    logits = model(s[None], sm[None], q[None])
    assert logits.shape == (1, 2, 16, 16)
    assert torch.equal(logits.argmax(1)[0].bool(), qm)


@pytest.mark.parametrize("support_mask,match", [
    (torch.ones(1, 8, 8, dtype=torch.bool), r"do not match the support images"),
    (torch.zeros(1, 16, 16, dtype=torch.bool), r"\[0\] are empty"),
])
def test_bad_supports_fail_before_any_work(support_mask, match) -> None:
    calls = []
    model = PrototypeSegmenter(lambda x: calls.append(1) or x)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(1, 3, 16, 16), support_mask, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="k >= 1"):
        model(torch.zeros(0, 3, 16, 16), torch.zeros(0, 16, 16, dtype=torch.bool), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="query"):
        model(torch.zeros(1, 3, 16, 16), torch.ones(1, 16, 16, dtype=torch.bool), torch.zeros(1, 1, 16, 16))
    assert calls == []


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


def test_diffews_predicts_one_mask_per_episode_and_checks_its_input() -> None:
    from heads.fewshot import DiffewS, mask_loss

    model = DiffewS("sd-unet-scenes")
    support = torch.rand(2, 3, 3, 64, 64) * 2 - 1  # 2 episodes, 3 shots
    masks = torch.zeros(2, 3, 64, 64, dtype=torch.bool)
    masks[..., 10:30, 10:30] = True
    logits = model(support, masks, torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 64, 64) and not model.fusion.bank
    loss = mask_loss(logits, masks[:, 0])
    loss.backward()
    assert model.backbone.model.conv_in.support.weight.grad is not None  # the support path trains
    with pytest.raises(ValueError, match="must be"):
        model(support, masks[:, :, :32], torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="query"):
        model(support, masks, torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="1 channels .* expects 3"):
        model(support[:, :, :1], masks, torch.rand(2, 1, 64, 64))


def test_fewshot_datamodule_keeps_novel_classes_out_of_training() -> None:
    from difffeat.data.episodes import FewShotDataModule

    dm = FewShotDataModule(fold=1, train_scenes=60, test_scenes=150, train_episodes=6, test_episodes=6)
    assert set(dm.novel) == {5, 6, 7, 8, 9} and not set(dm.novel) & set(dm.base)
    train = dm._episodes(True)
    assert all(set(train.dataset[i]["labels"].tolist()) <= set(dm.base) for i in range(60))
    assert {train[e]["class_id"] for e in range(6)} <= set(dm.base)
    assert {dm._episodes(False)[e]["class_id"] for e in range(6)} <= set(dm.novel)


def test_feature_cache_computes_each_image_once_whatever_the_batch() -> None:
    from heads.fewshot import FeatureCache

    calls: list[int] = []

    def features(images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        calls.append(len(images))
        noise = torch.stack([torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return images[:, :1, :2, :2] + noise

    a, b, c = torch.randn(3, 3, 4, 4).unbind()
    cache = FeatureCache(features)
    first = cache(torch.stack([a, b, a]))
    assert calls == [2] and torch.equal(first[0], first[2])
    again = cache(torch.stack([c, b]))  # b reused, only c computed
    assert calls == [2, 1] and torch.equal(again[1], first[1]) and len(cache) == 3
    # the noise follows the image, not its batch position
    torch.testing.assert_close(FeatureCache(features)(torch.stack([b, a]))[0], first[1])


def test_episode_masks_native_and_per_shot_vote() -> None:
    from heads.fewshot import episode_masks

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


def test_module_logs_the_protocol_scores_over_all_episodes() -> None:
    import lightning as L

    from difffeat.data.episodes import FewShotDataModule
    from heads.fewshot import FewShotSegmentationModule

    module = FewShotSegmentationModule(method="prototype", backbone="unet2d-tiny", layers=["up_blocks.0"],
                                       feature_size=16)
    data = FewShotDataModule(fold=0, train_scenes=40, test_scenes=120, test_episodes=7, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.test(module, data, verbose=False)[0]
    expected = FewShotIoU(20)
    for batch in data.test_dataloader():  # 4 batches, the last of one episode
        expected.update(module.predict_masks(batch), batch["query_mask"], batch["class_id"], batch["query_ignore"])
    scores = expected.compute()
    assert logged["test/miou"] == pytest.approx(float(scores["miou"]), abs=1e-6)
    assert logged["test/fbiou"] == pytest.approx(float(scores["fbiou"]), abs=1e-6)
