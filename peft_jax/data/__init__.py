"""Datasets for peft_jax: MedMNIST `.npz` files and TFDS builders, read through grain.

Valid `dataset.name`s: the 2D MedMNIST datasets (peft_jax.data.medmnist) and the TFDS
builders of peft_jax.data.builders (busi, chest_xray_pneumonia, ham10000, ...).

`load_dataset(cfg, seed=...)` returns a dataset's train / validation / test splits;
`train_batches` and `eval_batches` turn a split into model-ready batches.
"""
from __future__ import annotations

import ml_collections

from peft_jax.data import medmnist, tfds_loader
from peft_jax.data.pipeline import eval_batches, train_batches
from peft_jax.data.splits import DatasetSplits, Split, class_counts, stratified_subsample
from peft_jax.errors import UserError
from peft_jax.names import DATASET_NAMES, check_dataset

__all__ = ["DatasetSplits", "Split", "class_counts", "dataset_names", "eval_batches", "load_dataset",
           "stratified_subsample", "train_batches"]


def dataset_names() -> list[str]:
    """Every valid `dataset.name` (single-label MedMNIST sets and the TFDS builders)."""
    return list(DATASET_NAMES)


def load_dataset(cfg: ml_collections.ConfigDict, *, seed: int) -> DatasetSplits:
    """The splits of the dataset that `cfg` (an experiment's `dataset` sub-config) names.

    `cfg.fraction` < 1 keeps a stratified subsample of the training split (seeded by `seed`,
    at least one example per class); validation and test are never subsampled.
    """
    fraction = float(cfg.get("fraction", 1.0))
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"dataset.fraction must be in (0, 1], got {fraction!r}.")
    name = cfg.get("name")
    check_dataset(name)
    if name in medmnist.NAMES:
        splits = medmnist.load(cfg)
    else:
        splits = tfds_loader.load(cfg)
    if fraction < 1.0:
        splits.train = splits.train.take(stratified_subsample(splits.train.labels, fraction, seed))
    return splits
