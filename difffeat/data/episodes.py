"""Episodic few-shot segmentation data: a class, ``k`` annotated supports and a query.

Episode ``e`` of a fixed seed is always the same: the class is drawn first (uniformly among the
classes asked for), then a query and ``k`` supports among the images that contain that class, the
query excluded from the supports. Masks are binary: the pixels of that class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["FewShotDataModule", "FewShotEpisodes", "class_index"]


def class_index(dataset: Dataset, classes: Sequence[int]) -> dict[int, list[int]]:
    """Images per class.

    Reads each item's ``labels`` (object classes); the semantic map uses ``class id + 1``.

    Args:
        dataset: items with ``labels``.
        classes: the class ids to index.

    Returns:
        ``{class id: [dataset indices whose item lists it]}``, every asked class present.
    """
    wanted = set(classes)
    index: dict[int, list[int]] = {c: [] for c in classes}
    for i in range(len(dataset)):
        for c in set(torch.as_tensor(dataset[i]["labels"]).tolist()) & wanted:
            index[c].append(i)
    return index


class FewShotEpisodes(Dataset):
    """``episodes`` seeded ``k``-shot episodes over ``classes`` of a segmentation dataset.

    Items: ``query`` ``(3, H, W)``, ``query_mask`` ``(H, W)`` bool, ``query_ignore`` ``(H, W)`` bool
    (pixels the metric and the loss leave out, e.g. PASCAL's 255 boundary; all ``False`` for a dataset
    without them), ``support`` ``(k, 3, H, W)``, ``support_mask`` ``(k, H, W)`` bool, ``class_id`` and
    ``episode``.

    Args:
        dataset: items with ``image``, ``semantic`` (class id + 1 per pixel, 0 = background) and ``labels``,
            optionally ``ignore`` (bool ``(H, W)``).
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
        """Draws an episode's class and images (a pure function of the seed and ``episode``).

        Args:
            episode: episode index.

        Returns:
            ``(class id, query index, support indices)`` in the dataset.
        """
        rng = np.random.default_rng([self.seed, episode])
        c = self.classes[int(rng.integers(len(self.classes)))]
        pool = self.index[c]
        query = pool[int(rng.integers(len(pool)))]
        others = [i for i in pool if i != query]
        supports = [others[j] for j in rng.choice(len(others), self.shots, replace=False)]
        return c, query, supports

    def __getitem__(self, episode: int) -> dict[str, Any]:
        """The episode's images and binary masks (see the class docstring for the keys).

        Raises:
            IndexError: ``episode`` outside ``0 … episodes-1``.
        """
        if not 0 <= episode < self.episodes:
            raise IndexError(f"episode {episode} out of range for {self.episodes} episodes")
        c, query, supports = self.sample(episode)
        q = self.dataset[query]
        s = [self.dataset[i] for i in supports]
        ignore = q.get("ignore")
        if ignore is None:
            ignore = torch.zeros_like(q["semantic"], dtype=torch.bool)
        return {"query": q["image"], "query_mask": q["semantic"] == c + 1, "query_ignore": ignore,
                "support": torch.stack([x["image"] for x in s]),
                "support_mask": torch.stack([x["semantic"] == c + 1 for x in s]),
                "class_id": c, "episode": episode}


class FewShotDataModule(L.LightningDataModule):
    """Episodes on the generated scene benchmark for one fold.

    Training episodes come from scenes drawn with the fold's *base* classes only (the 15 classes of the
    other folds), so novel classes never appear in training, not even as background; validation and
    test episodes come from other scenes (another seed) with all 20 classes, and ask only about the
    fold's 5 *novel* classes.

    Args:
        fold: 0 … 3.
        shots: supports per episode.
        size: scene side.
        train_scenes: scenes behind the training episodes.
        test_scenes: scenes behind the validation / test episodes.
        train_episodes: training episodes per epoch.
        test_episodes: evaluation episodes (at least 300 on CPU, 1000 on GPU for the benchmark).
        seed: seed of scenes and episodes.
        batch_size: episodes per batch.
        num_workers: loader workers.
    """

    def __init__(self, fold: int = 0, shots: int = 1, size: int = 64, train_scenes: int = 2000,
                 test_scenes: int = 600, train_episodes: int = 2000, test_episodes: int = 300, seed: int = 0,
                 batch_size: int = 4, num_workers: int = 0) -> None:
        super().__init__()
        from difffeat.data.scenes import CLASSES, fold_classes

        self.novel = fold_classes(fold)
        self.base = [c for c in range(len(CLASSES)) if c not in self.novel]
        self.shots, self.size, self.seed = shots, size, seed
        self.train_scenes, self.test_scenes = train_scenes, test_scenes
        self.train_episodes, self.test_episodes = train_episodes, test_episodes
        self.batch_size, self.num_workers = batch_size, num_workers

    def _episodes(self, train: bool) -> FewShotEpisodes:
        from difffeat.data.scenes import SceneDataset

        if train:
            scenes = SceneDataset(self.train_scenes, self.size, self.seed, classes=self.base)
            return FewShotEpisodes(scenes, self.base, self.shots, self.train_episodes, self.seed)
        scenes = SceneDataset(self.test_scenes, self.size, self.seed + 1000)
        return FewShotEpisodes(scenes, self.novel, self.shots, self.test_episodes, self.seed + 1000)

    def train_dataloader(self) -> DataLoader:
        """Shuffled base-class episodes."""
        return DataLoader(self._episodes(True), self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Novel-class episodes, in order."""
        return DataLoader(self._episodes(False), self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The validation episodes (nothing is selected on them)."""
        return self.val_dataloader()
