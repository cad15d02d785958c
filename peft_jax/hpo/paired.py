"""Paired statistics over the test images that every run of a dataset shares.

Each finished run keeps its test labels and logits (``test_predictions.npz``). Two methods
trained with the same seed are compared on the same images, so their difference in macro-F1
has much less noise than two independent means. The interval resamples both the images and
the seeds (a two-level bootstrap), so it carries the training noise that three seeds show as
well as the test set's sampling noise.
"""
from __future__ import annotations

import pathlib

import numpy as np


def load_predictions(run_dir: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's test labels and predicted classes, or None for a run made before they were kept."""
    path = pathlib.Path(run_dir) / "test_predictions.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return f["labels"].astype(np.int64), np.argmax(f["logits"], axis=-1).astype(np.int64)


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 of one prediction vector, or of many bootstrap replicates at once.

    ``weights`` (replicates x images) counts how often each image was drawn. As in
    ``peft_jax.metrics.classification.macro_f1`` (the score in results.json), the mean runs over the
    classes present in the (drawn) labels or predictions.
    """
    w = np.ones((1, len(labels))) if weights is None else weights
    tp = np.stack([w @ ((labels == c) & (preds == c)) for c in range(num_classes)], -1)
    true = np.stack([w @ (labels == c) for c in range(num_classes)], -1)
    predicted = np.stack([w @ (preds == c) for c in range(num_classes)], -1)
    present = (true + predicted) > 0
    f1 = np.where(present, 2 * tp / np.maximum(true + predicted, 1e-12), 0.0)
    out = f1.sum(-1) / np.maximum(present.sum(-1), 1)
    return out[0] if weights is None else out


def paired_difference(labels: np.ndarray, preds_a: list[np.ndarray], preds_b: list[np.ndarray], num_classes: int,
                      num_samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean over seeds of macro-F1(a) - macro-F1(b), with a 95% two-level bootstrap interval.

    ``preds_a[i]`` and ``preds_b[i]`` come from runs with the same seed. Each replicate draws the
    seeds and the test images with replacement; ``p_below_zero`` is the share of replicates in
    which a does not beat b (a one-sided bootstrap p-value for "a is better").
    """
    if not preds_a or len(preds_a) != len(preds_b):
        raise ValueError(f"paired_difference needs runs paired by seed, got {len(preds_a)} and {len(preds_b)}")
    rng = np.random.default_rng(seed)
    n, k = len(labels), len(preds_a)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(num_samples)]).astype(float)
    per_seed = np.stack([macro_f1(labels, a, num_classes, weights) - macro_f1(labels, b, num_classes, weights)
                         for a, b in zip(preds_a, preds_b)], axis=-1)  # replicates x seeds
    drawn = rng.integers(0, k, (num_samples, k))
    replicates = np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1)
    point = float(np.mean([macro_f1(labels, a, num_classes) - macro_f1(labels, b, num_classes)
                           for a, b in zip(preds_a, preds_b)]))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {"diff": point, "low": float(low), "high": float(high), "p_below_zero": float(np.mean(replicates <= 0)),
            "seeds": k}
