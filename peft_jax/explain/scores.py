"""How much of an attribution map falls on the lesion: per-image scores against a binary mask, and
seeded bootstrap confidence intervals over images.

Every score reads the positive attribution (the evidence for the explained class; negative values
count as 0): signed pixel attributions (gradient x input, integrated gradients) mix signs at
random in textured skin, so an AUROC of signed values sits at 0.5 whatever their magnitudes.

- ``energy``: the energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the
  positive attribution that lies inside the mask. A map spread evenly scores the mask's area.
- ``pointing``: the pointing game (Zhang et al. 2018): 1 if the map's maximum is inside the mask.
- ``auroc``: the AUROC of the (positive) attribution values for mask pixels against background
  pixels (0.5: no preference), ties counted half.

A score that is undefined for an image (a map with no positive mass, a constant map, a mask that
is empty or the whole frame) is NaN and left out of the means and intervals, which say how many
images they used.
"""
from __future__ import annotations

import numpy as np

SCORES = ("energy", "pointing", "auroc")


def energy_in_mask(attribution: np.ndarray, mask: np.ndarray) -> float:
    positive = np.maximum(np.asarray(attribution, np.float64), 0.0)
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else float("nan")


def pointing_hit(attribution: np.ndarray, mask: np.ndarray) -> float:
    a = np.asarray(attribution)
    if a.max() == a.min():
        return float("nan")
    return float(mask.reshape(-1)[int(np.argmax(a))])


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    values = np.asarray(values).reshape(-1)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def mask_auroc(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Mann-Whitney U / (n_mask * n_background) of the attribution values."""
    mask = np.asarray(mask, bool).reshape(-1)
    n_in, n_out = int(mask.sum()), int((~mask).sum())
    if n_in == 0 or n_out == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(attribution, np.float64).reshape(-1))
    u = ranks[mask].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def image_scores(attribution: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    mask = np.asarray(mask, bool)
    if attribution.shape != mask.shape:
        raise ValueError(f"attribution {attribution.shape} and mask {mask.shape} differ in shape")
    positive = np.maximum(attribution, 0.0)
    return {"energy": energy_in_mask(positive, mask), "pointing": pointing_hit(positive, mask),
            "auroc": mask_auroc(positive, mask)}


def bootstrap_ci(values, *, num_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean and percentile bootstrap interval over the finite values (images resampled with replacement)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(num_resamples, len(v)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(v.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(len(v))}


def summarize(per_image: dict[str, list[float]], *, seed: int = 0, num_resamples: int = 1000) -> dict:
    """``{score: bootstrap_ci(values)}`` for every score of ``per_image``."""
    return {k: bootstrap_ci(v, seed=seed, num_resamples=num_resamples) for k, v in per_image.items()}
