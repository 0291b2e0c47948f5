"""Episodic few-shot segmentation data: a class, ``k`` annotated supports and a query.

Episode ``e`` of a fixed seed is always the same: the class is drawn first (uniformly among the
classes asked for), then a query and ``k`` supports among the images that contain that class, the
query excluded from the supports. Masks are binary: the pixels of that class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["FewShotEpisodes", "class_index"]


def class_index(dataset: Dataset, classes: Sequence[int]) -> dict[int, list[int]]:
    """Images per class: ``{class id: [dataset indices whose semantic map holds it]}``.

    Reads each item's ``labels`` (object classes); the semantic map uses ``class id + 1``.
    """
    wanted = set(classes)
    index: dict[int, list[int]] = {c: [] for c in classes}
    for i in range(len(dataset)):
        for c in set(torch.as_tensor(dataset[i]["labels"]).tolist()) & wanted:
            index[c].append(i)
    return index


class FewShotEpisodes(Dataset):
    """``episodes`` seeded ``k``-shot episodes over ``classes`` of a segmentation dataset.

    Items: ``query`` ``(3, H, W)``, ``query_mask`` ``(H, W)`` bool, ``support`` ``(k, 3, H, W)``,
    ``support_mask`` ``(k, H, W)`` bool, ``class_id`` and ``episode``.

    Args:
        dataset: items with ``image``, ``semantic`` (class id + 1 per pixel, 0 = background) and ``labels``.
        classes: the classes episodes are drawn from (a fold's novel classes at test time, its base
            classes in training).
        shots: ``k`` supports per episode (>= 1).
        episodes: number of episodes.
        seed: episode seed.

    Raises:
        ValueError: zero shots, or a class with fewer than ``k + 1`` images (named, with its count).
    """

    def __init__(self, dataset: Dataset, classes: Sequence[int], shots: int = 1, episodes: int = 300,
                 seed: int = 0) -> None:
        if shots < 1:
            raise ValueError(f"an episode needs at least one support image, got shots={shots}")
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        if not classes:
            raise ValueError("give at least one class")
        self.dataset, self.classes = dataset, list(classes)
        self.shots, self.episodes, self.seed = shots, episodes, seed
        self.index = class_index(dataset, self.classes)
        short = {c: len(v) for c, v in self.index.items() if len(v) < shots + 1}
        if short:
            raise ValueError(f"classes {short} (class: images) have fewer than shots + 1 = {shots + 1} images; "
                             f"use more images or fewer shots")

    def __len__(self) -> int:
        return self.episodes

    def sample(self, episode: int) -> tuple[int, int, list[int]]:
        """``(class id, query index, support indices)`` of an episode."""
        rng = np.random.default_rng([self.seed, episode])
        c = self.classes[int(rng.integers(len(self.classes)))]
        pool = self.index[c]
        query = pool[int(rng.integers(len(pool)))]
        others = [i for i in pool if i != query]
        supports = [others[j] for j in rng.choice(len(others), self.shots, replace=False)]
        return c, query, supports

    def __getitem__(self, episode: int) -> dict[str, Any]:
        if not 0 <= episode < self.episodes:
            raise IndexError(f"episode {episode} out of range for {self.episodes} episodes")
        c, query, supports = self.sample(episode)
        q = self.dataset[query]
        s = [self.dataset[i] for i in supports]
        return {"query": q["image"], "query_mask": q["semantic"] == c + 1,
                "support": torch.stack([x["image"] for x in s]),
                "support_mask": torch.stack([x["semantic"] == c + 1 for x in s]),
                "class_id": c, "episode": episode}
