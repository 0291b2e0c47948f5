"""The few-shot benchmark's statistics: resampled mIoU, paired bootstrap, other-class supports."""

from __future__ import annotations

import numpy as np
import torch

from difffeat.data.episodes import FewShotDataModule
from experiments.fewshot_benchmark import OtherClassSupport, _miou, paired_gap
from heads.fewshot import FewShotIoU


def _scores(seed: int, n: int = 40) -> dict:
    rng = np.random.default_rng(seed)
    union = rng.integers(5, 50, n).astype(float)
    return {"inter": (union * rng.uniform(0, 1, n)).round().tolist(), "union": union.tolist(),
            "class": rng.integers(0, 5, n).tolist()}


def test_resampled_miou_of_all_episodes_is_the_protocol_miou() -> None:
    s = _scores(0)
    pred = torch.zeros(40, 1, 50, dtype=torch.bool)  # episodes with the given intersection and union
    target = torch.zeros(40, 1, 50, dtype=torch.bool)
    for e, (i, u) in enumerate(zip(s["inter"], s["union"], strict=True)):
        target[e, 0, : int(u)] = True
        pred[e, 0, : int(i)] = True
    metric = FewShotIoU(5)
    metric.update(pred, target, torch.tensor(s["class"]))
    full = _miou(np.array(s["inter"]), np.array(s["union"]), np.array(s["class"]), np.arange(40)[None])
    np.testing.assert_allclose(full[0], 100 * float(metric.compute()["miou"]))


def test_paired_gap_is_zero_for_identical_conditions_and_brackets_a_real_gap() -> None:
    a = _scores(1)
    assert paired_gap([a], [a]) == (0.0, 0.0, 0.0)
    worse = {**a, "inter": [0.5 * i for i in a["inter"]]}
    point, low, high = paired_gap([a, a], [worse, worse])
    assert 0 < low <= point <= high


def test_other_class_support_keeps_the_query_and_changes_the_class() -> None:
    dm = FewShotDataModule(fold=0, size=32, test_scenes=120, test_episodes=8, min_objects=2, distinct=True)
    episodes = dm.episodes(False)
    swapped = OtherClassSupport(episodes)
    for e in range(8):
        own, other = episodes[e], swapped[e]
        assert torch.equal(own["query"], other["query"]) and torch.equal(own["query_mask"], other["query_mask"])
        assert other["support_mask"].any() and not torch.equal(own["support"], other["support"])


def test_attention_entropy_reads_the_query_and_bank_keys() -> None:
    from experiments.fewshot_benchmark import attention_entropy
    from heads.fewshot_diffews import DiffewS

    torch.manual_seed(0)
    data = FewShotDataModule(fold=0, size=32, train_scenes=60, test_scenes=60, test_episodes=4, min_objects=2,
                             distinct=True, textured=True)
    episodes = data.episodes(False, 1, 4)
    model = DiffewS("sd-unet-scenes-attn2").eval()
    trained = attention_entropy(model, episodes, n=4)
    for attn in model.fusion.attns.values():  # zero queries: every token spreads its attention evenly
        torch.nn.init.zeros_(attn.to_q.weight)
    uniform = attention_entropy(model, episodes, n=4)
    assert list(uniform) == ["16x16", "8x8", "4x4"]
    for entropy, share in uniform.values():
        assert abs(entropy - 1) < 1e-5 and abs(share - 0.5) < 1e-5  # 1-shot: half the keys are the support's
    assert min(entropy for entropy, _ in trained.values()) < 0.999  # a random init is not uniform
    assert "read" not in vars(model.fusion)  # the wrapper is gone
