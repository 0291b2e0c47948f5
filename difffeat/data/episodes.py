"""Episodic few-shot segmentation data: a class, ``k`` annotated supports and a query.

Episode ``e`` of a fixed seed is always the same: the class is drawn first (uniformly among the
classes asked for), then a query and ``k`` supports among the images that contain that class, the
query excluded from the supports. Masks are binary: the pixels of that class only, so a query that
holds several classes is labelled with the episode's class alone.

Two training options make a model that ignores its support pay for it (a model that segments "every
object" scores the same with any support on plain episodes):

* **counterfactual pairs** (``counterfactual=True``): episodes ``2j`` and ``2j + 1`` share one query
  that holds two different classes ``A`` and ``B``; episode ``2j`` has ``A``-supports and the ``A``
  pixels as target, episode ``2j + 1`` has ``B``-supports and the ``B`` pixels. The same image with two
  different targets: only the support says which. :class:`PairBatchSampler` keeps a pair in one batch.
* **negative episodes** (``negative_fraction`` of the episodes, training only): the supports show a
  class that is absent from the query, and the target is empty. Evaluation episodes
  (``evaluation=True``) refuse them, since an empty target would count as a zero-IoU episode of its
  class in the protocol's metric; :func:`check_evaluation_batch` lets an evaluation loop check a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["Episode", "FewShotDataModule", "FewShotEpisodes", "PairBatchSampler", "check_evaluation_batch",
           "class_index"]


def _label_sets(dataset: Dataset, classes: Sequence[int]) -> list[set[int]]:
    """Per image, the asked classes its item lists (one pass over the dataset)."""
    wanted = set(classes)
    return [set(torch.as_tensor(dataset[i]["labels"]).tolist()) & wanted for i in range(len(dataset))]


def class_index(dataset: Dataset, classes: Sequence[int]) -> dict[int, list[int]]:
    """Images per class.

    Reads each item's ``labels`` (object classes); the semantic map uses ``class id + 1``.

    Args:
        dataset: items with ``labels``.
        classes: the class ids to index.

    Returns:
        ``{class id: [dataset indices whose item lists it]}``, every asked class present.
    """
    return _index(_label_sets(dataset, classes), classes)


def _index(labels: list[set[int]], classes: Sequence[int]) -> dict[int, list[int]]:
    index: dict[int, list[int]] = {c: [] for c in classes}
    for i, present in enumerate(labels):
        for c in present:
            index[c].append(i)
    return index


class Episode(NamedTuple):
    """One drawn episode: dataset indices and what the target is."""

    class_id: int
    query: int
    supports: list[int]
    #: the supports' class is absent from the query (empty target; training only)
    negative: bool
    #: counterfactual pair number (episodes ``2·pair`` and ``2·pair + 1``), ``-1`` outside pairs
    pair: int


def check_evaluation_batch(batch: dict[str, Any]) -> None:
    """Refuses a batch with negative episodes before it is scored.

    Args:
        batch: collated :class:`FewShotEpisodes` items (a batch without ``negative`` passes).

    Raises:
        ValueError: some episode is negative (their numbers named).
    """
    negative = batch.get("negative")
    if negative is not None and torch.as_tensor(negative).any():
        ids = torch.as_tensor(batch["episode"])[torch.as_tensor(negative).bool()].tolist()
        raise ValueError(f"negative episodes {ids} reached evaluation: their empty targets would count as zero-IoU "
                         f"episodes of their class; evaluate on episodes built with evaluation=True")


class FewShotEpisodes(Dataset):
    """``episodes`` seeded ``k``-shot episodes over ``classes`` of a segmentation dataset.

    Items: ``query`` ``(3, H, W)``, ``query_mask`` ``(H, W)`` bool, ``query_ignore`` ``(H, W)`` bool
    (pixels the metric and the loss leave out, e.g. PASCAL's 255 boundary; all ``False`` for a dataset
    without them), ``support`` ``(k, 3, H, W)``, ``support_mask`` ``(k, H, W)`` bool, ``class_id``,
    ``episode``, ``query_index`` (the query's dataset index), ``negative`` (bool) and ``pair`` (see
    :class:`Episode`).

    With ``counterfactual`` and ``negative_fraction`` at their defaults, episodes are drawn exactly as
    before these options existed (same random stream).

    Args:
        dataset: items with ``image``, ``semantic`` (class id + 1 per pixel, 0 = background) and ``labels``,
            optionally ``ignore`` (bool ``(H, W)``).
        classes: the classes episodes are drawn from (a fold's novel classes at test time, its base
            classes in training).
        shots: ``k`` supports per episode (>= 1).
        episodes: number of episodes.
        seed: episode seed.
        negative_fraction: expected fraction of negative episodes (support class absent from the query,
            empty target), in ``[0, 0.5]``; 0.1–0.2 for training. With ``counterfactual`` a pair's second
            episode is made negative with probability ``2 · negative_fraction`` (the same query then
            comes with its own class and with an absent one).
        counterfactual: draw counterfactual pairs (episodes ``2j``, ``2j + 1``; ``episodes`` must be even).
            A pair's class ``A`` is drawn uniformly, then a query holding ``A`` and at least one other
            asked class, then ``B`` uniformly among the query's other asked classes.
        evaluation: episodes for validation / test: negative episodes are refused.

    Raises:
        ValueError: zero shots, or a class with fewer than ``k + 1`` images (named, with its count);
            negative episodes asked for evaluation; a fraction outside ``[0, 0.5]``; an odd number of
            counterfactual episodes, or a class that no image shares with another asked class (named);
            negative episodes for a class that every image holds (named).
    """

    def __init__(self, dataset: Dataset, classes: Sequence[int], shots: int = 1, episodes: int = 300,
                 seed: int = 0, negative_fraction: float = 0.0, counterfactual: bool = False,
                 evaluation: bool = False) -> None:
        if shots < 1:
            raise ValueError(f"an episode needs at least one support image, got shots={shots}")
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        if not classes:
            raise ValueError("give at least one class")
        if not 0 <= negative_fraction <= 0.5:
            raise ValueError(f"negative_fraction must be in [0, 0.5] (0.1-0.2 for training), got {negative_fraction}")
        if evaluation and negative_fraction > 0:
            raise ValueError("negative episodes are for training only: an evaluation episode with an empty target "
                             "would score as a zero-IoU episode of its class; use negative_fraction=0")
        if counterfactual and episodes % 2:
            raise ValueError(f"counterfactual pairs need an even number of episodes, got {episodes}")
        self.dataset, self.classes = dataset, list(classes)
        self.shots, self.episodes, self.seed = shots, episodes, seed
        self.negative_fraction, self.counterfactual, self.evaluation = negative_fraction, counterfactual, evaluation
        self.labels = _label_sets(dataset, self.classes)
        self.index = _index(self.labels, self.classes)
        short = {c: len(v) for c, v in self.index.items() if len(v) < shots + 1}
        if short:
            raise ValueError(f"classes {short} (class: images) have fewer than shots + 1 = {shots + 1} images; "
                             f"use more images or fewer shots")
        if counterfactual:
            self.shared = {c: [i for i in v if len(self.labels[i]) > 1] for c, v in self.index.items()}
            alone = [c for c, v in self.shared.items() if not v]
            if alone:
                raise ValueError(f"classes {alone} never share an image with another of the classes, so they cannot "
                                 f"be in a counterfactual pair; use scenes with several classes per image")
        if negative_fraction > 0:
            self.without = {c: [i for i, present in enumerate(self.labels) if c not in present]
                            for c in self.classes}
            full = [c for c, v in self.without.items() if not v]
            if full and not counterfactual:
                raise ValueError(f"classes {full} are in every image, so no negative query exists for them")

    def __len__(self) -> int:
        return self.episodes

    def _supports(self, rng: np.random.Generator, c: int, query: int) -> list[int]:
        others = [i for i in self.index[c] if i != query]
        return [others[j] for j in rng.choice(len(others), self.shots, replace=False)]

    def draw(self, episode: int) -> Episode:
        """Draws an episode (a pure function of the seed and ``episode``; both members of a pair alike).

        Args:
            episode: episode index.

        Returns:
            The :class:`Episode`: class, query and support indices in the dataset, and its kind.
        """
        if self.counterfactual:
            return self._draw_pair(episode // 2)[episode % 2]
        rng = np.random.default_rng([self.seed, episode])
        c = self.classes[int(rng.integers(len(self.classes)))]
        # drawn only when asked for, so that episodes without negatives keep their original random stream
        if self.negative_fraction > 0 and rng.random() < self.negative_fraction:
            pool = self.without[c]
            query = pool[int(rng.integers(len(pool)))]
            return Episode(c, query, self._supports(rng, c, query), True, -1)
        pool = self.index[c]
        query = pool[int(rng.integers(len(pool)))]
        return Episode(c, query, self._supports(rng, c, query), False, -1)

    def _draw_pair(self, pair: int) -> tuple[Episode, Episode]:
        rng = np.random.default_rng([self.seed, pair, 2])  # another stream than the single episodes'
        a = self.classes[int(rng.integers(len(self.classes)))]
        pool = self.shared[a]
        query = pool[int(rng.integers(len(pool)))]
        first = Episode(a, query, self._supports(rng, a, query), False, pair)
        absent = [c for c in self.classes if c not in self.labels[query]]
        if self.negative_fraction > 0 and rng.random() < 2 * self.negative_fraction and absent:
            b = absent[int(rng.integers(len(absent)))]
            return first, Episode(b, query, self._supports(rng, b, query), True, pair)
        others = sorted(self.labels[query] - {a})
        b = others[int(rng.integers(len(others)))]
        return first, Episode(b, query, self._supports(rng, b, query), False, pair)

    def sample(self, episode: int) -> tuple[int, int, list[int]]:
        """Draws an episode's class and images (see :meth:`draw`).

        Args:
            episode: episode index.

        Returns:
            ``(class id, query index, support indices)`` in the dataset.
        """
        return self.draw(episode)[:3]

    def __getitem__(self, episode: int) -> dict[str, Any]:
        """The episode's images and binary masks (see the class docstring for the keys).

        Raises:
            IndexError: ``episode`` outside ``0 … episodes-1``.
            ValueError: supports of mixed sizes, or a support mask empty at the size the dataset serves
                (e.g. a small object lost to nearest resizing), naming the episode, the shot and the image;
                a negative query that shows the class its labels leave out.
        """
        if not 0 <= episode < self.episodes:
            raise IndexError(f"episode {episode} out of range for {self.episodes} episodes")
        c, query, supports, negative, pair = self.draw(episode)
        q = self.dataset[query]
        s = [self.dataset[i] for i in supports]
        sizes = [tuple(x["image"].shape[-2:]) for x in s]
        if len(set(sizes)) > 1:
            raise ValueError(f"episode {episode}: its {len(s)} shots have mixed sizes "
                             + ", ".join(f"shot {j} (image {i}) {h}x{w}" for j, (i, (h, w)) in
                                         enumerate(zip(supports, sizes, strict=True)))
                             + "; serve every image at one size (e.g. the dataset's size argument)")
        masks = torch.stack([x["semantic"] == c + 1 for x in s])
        for j, m in enumerate(masks):
            if not m.any():
                raise ValueError(f"episode {episode}: the support mask of shot {j} (image {supports[j]}, class {c}) "
                                 f"is empty at {m.shape[0]}x{m.shape[1]}, though the image lists the class; "
                                 f"serve larger images or drop the image from the class")
        query_mask = q["semantic"] == c + 1
        if negative and query_mask.any():
            raise ValueError(f"episode {episode}: negative query {query} shows class {c} on {int(query_mask.sum())} "
                             f"pixels although its labels do not list it")
        ignore = q.get("ignore")
        if ignore is None:
            ignore = torch.zeros_like(q["semantic"], dtype=torch.bool)
        return {"query": q["image"], "query_mask": query_mask, "query_ignore": ignore,
                "support": torch.stack([x["image"] for x in s]), "support_mask": masks,
                "class_id": c, "episode": episode, "query_index": query, "negative": negative, "pair": pair}


class PairBatchSampler(Sampler[list[int]]):
    """Batches of whole counterfactual pairs: episodes ``2j`` and ``2j + 1`` always share a batch.

    Pairs are shuffled (per epoch: Lightning calls :meth:`set_epoch`; a plain loop gets a new order per
    iteration), never split; the last batch may be smaller.

    Args:
        episodes: number of episodes (even).
        batch_size: episodes per batch (even).
        shuffle: shuffle the pairs.
        seed: shuffling seed.

    Raises:
        ValueError: an odd ``episodes`` or ``batch_size``.
    """

    def __init__(self, episodes: int, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        if episodes % 2 or batch_size % 2 or batch_size < 2:
            raise ValueError(f"pairs need an even number of episodes and an even batch size >= 2, got {episodes} "
                             f"and {batch_size}")
        self.episodes, self.batch_size, self.shuffle, self.seed = episodes, batch_size, shuffle, seed
        self.epoch, self._iterations = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the next shuffle."""
        self.epoch, self._iterations = epoch, 0

    def __len__(self) -> int:
        return -(-self.episodes // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        pairs = np.arange(self.episodes // 2)
        if self.shuffle:
            pairs = np.random.default_rng([self.seed, self.epoch, self._iterations]).permutation(pairs)
            self._iterations += 1
        per = self.batch_size // 2
        for b in range(0, len(pairs), per):
            yield [int(e) for j in pairs[b:b + per] for e in (2 * j, 2 * j + 1)]


class FewShotDataModule(L.LightningDataModule):
    """Episodes on the generated scene benchmark for one fold.

    Training episodes come from scenes drawn with the fold's *base* classes only (the 15 classes of the
    other folds), so novel classes never appear in training, not even as background; validation and
    test episodes come from other scenes (another seed) with all 20 classes, and ask only about the
    fold's 5 *novel* classes. Validation and test episodes are never negative (they are built with
    ``evaluation=True``); counterfactual pairs and negatives are training options.

    The defaults give the version-1 benchmark (scenes and episodes unchanged). The episodes that punish
    ignoring the support: ``min_objects=2, distinct=True, textured=True, counterfactual=True,
    negative_fraction=0.15`` (2–4 objects of distinct classes with a random texture each, in training
    and test scenes alike).

    Args:
        fold: 0 … 3.
        shots: supports per episode.
        size: scene side.
        train_scenes: scenes behind the training episodes.
        test_scenes: scenes behind the validation / test episodes.
        train_episodes: training episodes per epoch.
        test_episodes: evaluation episodes (at least 300 on CPU, 1000 on GPU for the benchmark).
        seed: seed of scenes and episodes.
        batch_size: episodes per batch (even with ``counterfactual``).
        num_workers: loader workers.
        min_objects: at least this many visible objects per scene (train and test scenes).
        max_objects: at most this many objects per scene.
        distinct: objects of a scene have distinct classes.
        textured: a random texture per object.
        counterfactual: training episodes in counterfactual pairs, a pair per batch never split.
        negative_fraction: fraction of negative training episodes (0.1–0.2).
        cache_scenes: keep rendered scenes in memory (see :class:`~difffeat.data.scenes.SceneDataset`);
            the datamodule's scene sets are built once and shared by all its episode sets.
    """

    def __init__(self, fold: int = 0, shots: int = 1, size: int = 64, train_scenes: int = 2000,
                 test_scenes: int = 600, train_episodes: int = 2000, test_episodes: int = 300, seed: int = 0,
                 batch_size: int = 4, num_workers: int = 0, min_objects: int = 1, max_objects: int = 4,
                 distinct: bool = False, textured: bool = False, counterfactual: bool = False,
                 negative_fraction: float = 0.0, cache_scenes: bool = False) -> None:
        super().__init__()
        from difffeat.data.scenes import CLASSES, fold_classes

        self.novel = fold_classes(fold)
        self.base = [c for c in range(len(CLASSES)) if c not in self.novel]
        self.shots, self.size, self.seed = shots, size, seed
        self.train_scenes, self.test_scenes = train_scenes, test_scenes
        self.train_episodes, self.test_episodes = train_episodes, test_episodes
        self.batch_size, self.num_workers = batch_size, num_workers
        self.scene_options = {"max_objects": max_objects, "min_objects": min_objects, "distinct": distinct,
                              "textured": textured}
        self.counterfactual, self.negative_fraction = counterfactual, negative_fraction
        self.cache_scenes, self._scenes = cache_scenes, {}
        if counterfactual and (batch_size % 2 or train_episodes % 2):
            raise ValueError(f"counterfactual pairs need an even batch_size and train_episodes, got {batch_size} "
                             f"and {train_episodes}")

    def scenes(self, train: bool) -> Dataset:
        """The scenes behind the training episodes or the evaluation ones, built once per datamodule.

        Training scenes hold the base classes only (``seed``), evaluation scenes all classes (``seed + 1000``).
        """
        from difffeat.data.scenes import SceneDataset

        if train not in self._scenes:
            if train:
                self._scenes[train] = SceneDataset(self.train_scenes, self.size, self.seed, classes=self.base,
                                                   cache=self.cache_scenes, **self.scene_options)
            else:
                self._scenes[train] = SceneDataset(self.test_scenes, self.size, self.seed + 1000,
                                                   cache=self.cache_scenes, **self.scene_options)
        return self._scenes[train]

    def episodes(self, train: bool, shots: int | None = None, episodes: int | None = None,
                 counterfactual: bool | None = None) -> FewShotEpisodes:
        """The training episodes (base classes) or the evaluation episodes (novel classes, never negative).

        Args:
            train: training or evaluation episodes.
            shots: supports per episode (default: the datamodule's).
            episodes: number of episodes (default: ``train_episodes`` / ``test_episodes``).
            counterfactual: draw counterfactual pairs (default: the datamodule's setting for training,
                off for evaluation; on for evaluation gives the pairs a selectivity control scores).

        Returns:
            The episodes, seeded like the datamodule's loaders.
        """
        shots = self.shots if shots is None else shots
        if train:
            return FewShotEpisodes(self.scenes(True), self.base, shots, episodes or self.train_episodes, self.seed,
                                   negative_fraction=self.negative_fraction,
                                   counterfactual=self.counterfactual if counterfactual is None else counterfactual)
        return FewShotEpisodes(self.scenes(False), self.novel, shots, episodes or self.test_episodes, self.seed + 1000,
                               counterfactual=bool(counterfactual), evaluation=True)

    def train_dataloader(self) -> DataLoader:
        """Shuffled base-class episodes (whole counterfactual pairs per batch when pairs are drawn)."""
        episodes = self.episodes(True)
        if self.counterfactual:
            sampler = PairBatchSampler(len(episodes), self.batch_size, shuffle=True, seed=self.seed)
            return DataLoader(episodes, batch_sampler=sampler, num_workers=self.num_workers)
        return DataLoader(episodes, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Novel-class episodes, in order (never negative)."""
        return DataLoader(self.episodes(False), self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The validation episodes (nothing is selected on them)."""
        return self.val_dataloader()
