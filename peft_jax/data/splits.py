"""In-memory dataset splits and the stratified training subsample used for low-data regimes."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from peft_jax.errors import UserError


@dataclasses.dataclass
class Split:
    """One split of a classification dataset.

    `images` is a uint8 array (N, H, W, C) with C in {1, 3} for small datasets held in memory,
    or any sequence of such (H, W, C) arrays (datasets read lazily from disk, whose images
    differ in size). `labels` is always in memory so that splits can be stratified and counted.
    `subgroups` maps a metadata field (sex, age_group, skin_type, ...) to one value per
    example, for per-subgroup (fairness) metrics.
    """

    images: np.ndarray | Sequence[np.ndarray]
    labels: np.ndarray
    subgroups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    ids: np.ndarray | None = None  # the example ids of a TFDS-built dataset (e.g. HAM10000 image ids)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels.")
        if self.ids is not None and len(self.ids) != len(self.labels):
            raise ValueError(f"Split has {len(self.ids)} ids for {len(self.labels)} examples.")
        for key, values in self.subgroups.items():
            if len(values) != len(self.labels):
                raise ValueError(f"Subgroup {key!r} has {len(values)} values for {len(self.labels)} examples.")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> "Split":
        """The examples at `indices` (a subsample), images included."""
        if isinstance(self.images, np.ndarray):
            images: Any = self.images[indices]
        else:
            images = _Subset(self.images, indices)
        return Split(images, self.labels[indices], {k: np.asarray(v)[indices] for k, v in self.subgroups.items()},
                     None if self.ids is None else self.ids[indices])


class _Subset:
    """A lazy view of some items of a lazy image sequence, so subsampling never loads images."""

    def __init__(self, items: Sequence[np.ndarray], indices: np.ndarray):
        self._items = items
        self._indices = np.asarray(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._items[int(self._indices[index])]


@dataclasses.dataclass
class DatasetSplits:
    """A dataset's train / validation / test splits and the names of its classes."""

    name: str
    class_names: list[str]
    train: Split
    validation: Split
    test: Split

    def __post_init__(self):
        """Every loader builds one of these: labels and non-empty splits are checked here, once."""
        for split_name in ("train", "validation", "test"):
            split = getattr(self, split_name)
            if not len(split):
                raise UserError(f"dataset {self.name!r}: the {split_name} split is empty; check the dataset's "
                                 "files (or its manual_dir) and prepare it again")
            check_labels(split.labels, self.num_classes, f"dataset {self.name!r} {split_name} split")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Refuses labels outside [0, num_classes): they would train against an all-zero one-hot."""
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        values, counts = np.unique(bad, return_counts=True)
        found = ", ".join(f"{int(v)} ({int(n)}x)" for v, n in zip(values[:5], counts[:5]))
        raise UserError(f"{where}: labels must be in [0, {num_classes}) for its {num_classes} classes, found "
                         f"{found}; fix the labels in the dataset's files (or its class list)")


def stratified_subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample keeping `fraction` of every class (at least one each).

    Each class is permuted once by the seed and a prefix is kept, so for one seed a smaller
    fraction is a subset of a larger one: low-data runs are nested, not independent draws.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"dataset.fraction must be in (0, 1], got {fraction!r}.")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        count = max(1, int(round(fraction * len(members))))
        keep.append(members[:count])
    return np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)


def class_counts(split: Split, class_names: Sequence[str]) -> dict[str, int]:
    """Examples per class, by class name (the form prepare_data.py prints)."""
    counts = np.bincount(split.labels, minlength=len(class_names))
    return {name: int(n) for name, n in zip(class_names, counts)}
