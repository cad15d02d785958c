"""Fréchet Inception Distance (Heusel et al. 2017) with a pluggable feature extractor.

FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The matrix square root is taken as
that of the symmetric positive semi-definite ``sqrt(S1) S2 sqrt(S1)``, whose trace equals
tr((S1 S2)^(1/2)); symmetric eigendecompositions in float64 stay real and stable where a
general ``sqrtm`` of the non-symmetric product picks up imaginary parts and fails on
singular covariances (fewer images than feature dimensions).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable

import numpy as np

from peft_jax.errors import UserError


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
        raise UserError(f"FID: statistics of different sizes {mu1.shape}/{sigma1.shape} and {mu2.shape}/{sigma2.shape}")
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


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> None:
    """Writes a dataset's feature statistics as .npz (mu, sigma: pytorch-fid's layout, plus num_images), so that
    the reference side of an FID is computed once."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), num_images=num_images)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a statistics .npz (ours or pytorch-fid's), checked for shape and finiteness."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # ValueError: text or pickled data
        raise UserError(f"{path}: not a readable .npz statistics file") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: a statistics file is an .npz holding 'mu' and 'sigma', not a single array")
    with data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise UserError(f"{path}: a statistics file needs arrays 'mu' and 'sigma', found {sorted(data.files)}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f"{path}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu or sigma holds non-finite values")
    return mu, sigma
