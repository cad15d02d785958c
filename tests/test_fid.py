"""The Fréchet distance against the scipy sqrtm reference formula, and its stability."""
import numpy as np
import pytest

scipy_linalg = pytest.importorskip("scipy.linalg")

from peft_jax.metrics import feature_statistics, fid, frechet_distance  # noqa: E402


def _reference(mu1, s1, mu2, s2):
    """The usual formula with scipy's general matrix square root of S1 S2."""
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    b = 0.5 + rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    got = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    want = _reference(*feature_statistics(a), *feature_statistics(b))
    assert got == pytest.approx(want, rel=1e-6)


def test_identical_sets_and_singular_covariances():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20, 64))  # fewer samples than dimensions: singular covariance
    assert abs(frechet_distance(*feature_statistics(a), *feature_statistics(a))) < 1e-4  # trace is ~64
    b = rng.standard_normal((20, 64)) + 1.0
    d = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert np.isfinite(d) and d > 64 * 0.5


def test_fid_over_batches_and_errors():
    rng = np.random.default_rng(4)
    images = [rng.uniform(-1, 1, (4, 8, 8, 3)) for _ in range(3)]
    pool = lambda x: x.mean(axis=(1, 2))  # noqa: E731
    assert fid(images, images, pool) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
