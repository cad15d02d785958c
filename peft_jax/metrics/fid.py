"""Fréchet Inception Distance (Heusel et al. 2017) with a pluggable feature extractor.

FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The matrix square root is taken as
that of the symmetric positive semi-definite ``sqrt(S1) S2 sqrt(S1)``, whose trace equals
tr((S1 S2)^(1/2)); symmetric eigendecompositions in float64 stay real and stable where a
general ``sqrtm`` of the non-symmetric product picks up imaginary parts and fails on
singular covariances (fewer images than feature dimensions).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between two Gaussians."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID: statistics of different sizes {mu1.shape}/{sigma1.shape} and {mu2.shape}/{sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(real: Iterable[np.ndarray], fake: Iterable[np.ndarray],
        features: Callable[[np.ndarray], np.ndarray]) -> float:
    """FID between two streams of NHWC image batches under a feature extractor (e.g. Inception pool3, or a
    chest X-ray network: the metric is only as meaningful as its features)."""
    def stats(batches):
        return feature_statistics(np.concatenate([np.asarray(features(b)) for b in batches]))

    return frechet_distance(*stats(real), *stats(fake))
