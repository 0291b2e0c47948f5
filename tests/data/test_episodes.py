"""Episodes that punish ignoring the support: counterfactual pairs, negative episodes, their guards."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from difffeat.data.episodes import (
    FewShotDataModule,
    FewShotEpisodes,
    PairBatchSampler,
    check_evaluation_batch,
    class_index,
)
from difffeat.data.scenes import SceneDataset

CLASSES = [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def scenes() -> SceneDataset:
    return SceneDataset(length=40, size=64, seed=7, classes=CLASSES, min_objects=2, distinct=True, textured=True)


def test_default_episodes_are_drawn_as_before() -> None:
    # from the sampler before pairs and negatives existed (same scenes, seed and shots)
    episodes = FewShotEpisodes(SceneDataset(length=40, size=64, classes=[0, 1, 2]), [0, 1, 2], shots=2,
                               episodes=10, seed=5)
    assert [episodes.sample(e) for e in range(4)] == [(2, 34, [33, 2]), (0, 32, [31, 18]), (2, 9, [22, 30]),
                                                      (2, 30, [11, 3])]
    assert not any(episodes.draw(e).negative for e in range(10)) and episodes[0]["pair"] == -1


def test_training_episodes_draw_the_class_uniformly_and_label_only_it(scenes) -> None:
    episodes = FewShotEpisodes(scenes, CLASSES, shots=1, episodes=600, seed=1)
    counts = Counter(episodes.draw(e).class_id for e in range(600))
    assert set(counts) == set(CLASSES) and all(70 <= n <= 130 for n in counts.values())  # 100 expected each
    others = 0
    for e in range(12):
        item = episodes[e]
        semantic = scenes[item["query_index"]]["semantic"]
        assert torch.equal(item["query_mask"], semantic == item["class_id"] + 1)
        others += int(((semantic > 0) & ~item["query_mask"]).sum() > 0)  # another class is there, unlabelled
    assert others == 12  # every query holds at least two classes


def test_counterfactual_pairs_give_one_query_two_distinct_targets(scenes) -> None:
    episodes = FewShotEpisodes(scenes, CLASSES, shots=2, episodes=16, seed=3, counterfactual=True)
    for j in range(8):
        a, b = episodes[2 * j], episodes[2 * j + 1]
        assert a["pair"] == b["pair"] == j and not a["negative"] and not b["negative"]
        assert a["query_index"] == b["query_index"] and torch.equal(a["query"], b["query"])  # one image
        assert a["class_id"] != b["class_id"]
        assert a["query_mask"].any() and b["query_mask"].any() and not (a["query_mask"] & b["query_mask"]).any()
        semantic = scenes[a["query_index"]]["semantic"]
        for item in (a, b):
            assert torch.equal(item["query_mask"], semantic == item["class_id"] + 1)
            assert item["support_mask"].flatten(1).any(1).all()  # each support shows its own class
            assert a["query_index"] not in episodes.draw(item["episode"]).supports
    assert episodes.draw(5) == FewShotEpisodes(scenes, CLASSES, 2, 16, 3, counterfactual=True).draw(5)


def test_negative_episodes_have_empty_targets_and_are_a_set_fraction(scenes) -> None:
    episodes = FewShotEpisodes(scenes, CLASSES, shots=1, episodes=400, seed=2, negative_fraction=0.15)
    negative = [e for e in range(400) if episodes.draw(e).negative]
    assert 0.10 <= len(negative) / 400 <= 0.20
    for e in negative[:10]:
        item = episodes[e]
        assert item["negative"] and not item["query_mask"].any()
        assert item["class_id"] not in scenes[item["query_index"]]["labels"].tolist()
        assert item["support_mask"].any()
    assert episodes[next(e for e in range(400) if e not in negative)]["query_mask"].any()
    # in pairs the second member of a pair carries them: the same query, once with its class, once without
    pairs = FewShotEpisodes(scenes, CLASSES, shots=1, episodes=400, seed=2, negative_fraction=0.15,
                            counterfactual=True)
    kinds = [pairs.draw(e).negative for e in range(400)]
    assert not any(kinds[0::2]) and 0.10 <= sum(kinds) / 400 <= 0.20
    j = kinds.index(True)
    a, b = pairs[j - 1], pairs[j]
    assert a["query_index"] == b["query_index"] and a["query_mask"].any() and not b["query_mask"].any()


def test_negative_episodes_never_reach_evaluation(scenes) -> None:
    with pytest.raises(ValueError, match="training only"):
        FewShotEpisodes(scenes, CLASSES, negative_fraction=0.1, evaluation=True)
    data = FewShotDataModule(fold=0, train_scenes=60, test_scenes=120, train_episodes=40, test_episodes=40,
                             batch_size=4, min_objects=2, distinct=True, textured=True, counterfactual=True,
                             negative_fraction=0.2)
    train = [b for b in data.train_dataloader()]
    assert sum(int(b["negative"].sum()) for b in train) > 0
    with pytest.raises(ValueError, match="reached evaluation"):
        for b in train:
            check_evaluation_batch(b)
    for loader in (data.val_dataloader(), data.test_dataloader()):
        assert loader.dataset.evaluation and loader.dataset.negative_fraction == 0
        for b in loader:
            assert not b["negative"].any() and b["query_mask"].flatten(1).any(1).all()
            check_evaluation_batch(b)
    # a training loader keeps every pair in one batch
    for b in train:
        q = b["query_index"].tolist()
        assert q[0::2] == q[1::2] and (b["pair"][0::2] == b["pair"][1::2]).all()


def test_pair_batch_sampler_covers_every_episode_once_per_epoch() -> None:
    sampler = PairBatchSampler(20, 6, shuffle=True, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 4 and [len(b) for b in first] == [6, 6, 6, 2]
    assert sorted(e for b in first for e in b) == list(range(20))
    assert all(b[i] // 2 == b[i + 1] // 2 and b[i] % 2 == 0 for b in first for i in range(0, len(b), 2))
    sampler.set_epoch(0)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert [b for b in PairBatchSampler(8, 4, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="even"):
        PairBatchSampler(8, 3)


class _Toy(Dataset):
    """Images with given sizes and semantic maps (the labels lists may disagree with the maps)."""

    def __init__(self, items: list[tuple[int, list[int], list[int]]]) -> None:
        self.items = items  # (side, labels, classes actually drawn)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        side, labels, drawn = self.items[i]
        semantic = torch.zeros(side, side, dtype=torch.long)
        for j, c in enumerate(drawn):
            semantic[j, :] = c + 1
        return {"image": torch.zeros(3, side, side), "semantic": semantic, "labels": torch.tensor(labels)}


def test_bad_episode_input(scenes) -> None:
    with pytest.raises(ValueError, match="even number of episodes"):
        FewShotEpisodes(scenes, CLASSES, episodes=5, counterfactual=True)
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        FewShotEpisodes(scenes, CLASSES, negative_fraction=0.6)
    single = SceneDataset(length=30, size=64, classes=[0, 1], max_objects=1)
    with pytest.raises(ValueError, match=r"classes \[0, 1\] never share an image"):
        FewShotEpisodes(single, [0, 1], counterfactual=True, episodes=4)
    with pytest.raises(ValueError, match="even batch_size"):
        FewShotDataModule(counterfactual=True, batch_size=3)
    everywhere = _Toy([(8, [0], [0])] * 3)
    with pytest.raises(ValueError, match=r"classes \[0\] are in every image"):
        FewShotEpisodes(everywhere, [0], negative_fraction=0.1)
    mixed = FewShotEpisodes(_Toy([(8, [0], [0]), (8, [0], [0]), (6, [0], [0])]), [0], shots=2, episodes=20)
    bad = next(e for e in range(20) if 2 in mixed.draw(e).supports)
    with pytest.raises(ValueError, match=rf"episode {bad}: its 2 shots have mixed sizes .*6x6"):
        mixed[bad]
    lost = FewShotEpisodes(_Toy([(8, [0], [0]), (8, [0], [])]), [0], shots=1, episodes=20)  # image 1: listed, not drawn
    bad = next(e for e in range(20) if lost.draw(e).supports == [1])
    with pytest.raises(ValueError, match=rf"episode {bad}: the support mask of shot 0 \(image 1, class 0\) is empty "
                                         r"at 8x8"):
        lost[bad]
    assert class_index(scenes, [0]) == {0: FewShotEpisodes(scenes, CLASSES).index[0]}
