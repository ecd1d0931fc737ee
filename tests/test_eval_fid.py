"""FID: zero against itself, and the same number as torchmetrics' and clean-fid's formulas on the same features."""

import numpy as np
import pytest
import torch
from scipy import linalg

from sb2.evaluation.fid import MomentAccumulator, frechet_distance, load_stats, save_stats


def clean_fid_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """clean-fid's ``frechet_distance`` (itself pytorch-fid's), restated as the reference."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # clean-fid passes disp=False, deprecated in SciPy 1.16
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift + np.abs(rng.normal(size=(n, d)))  # correlated, skewed


def _moments(x):
    acc = MomentAccumulator(x.shape[1])
    for chunk in np.array_split(x, 7):
        acc.update(torch.from_numpy(chunk))
    return acc.mean.numpy(), acc.cov.numpy()


def test_streaming_moments_equal_numpy():
    x = _features(503, 24, 0) * 100 + 1e4  # a large offset: a naive sum-of-squares would lose digits
    mu, sigma = _moments(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,d", [(400, 32), (20, 64)])  # well-posed, and rank-deficient (n < d)
def test_fid_against_itself_is_zero(n, d):
    mu, sigma = _moments(_features(n, d, 1))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_equals_torchmetrics_and_clean_fid_formulas():
    from torchmetrics.image.fid import _compute_fid

    mu1, s1 = _moments(_features(600, 48, 2))
    mu2, s2 = _moments(_features(500, 48, 3, shift=0.3))
    ours = frechet_distance(mu1, s1, mu2, s2)
    theirs_tm = _compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))).item()
    theirs_cf = clean_fid_frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(theirs_tm, abs=1e-4)
    assert ours == pytest.approx(theirs_cf, abs=1e-4)


def test_stats_round_trip_in_clean_fid_layout(tmp_path):
    mu, sigma = _moments(_features(50, 8, 4))
    path = save_stats(tmp_path / "ref.npz", torch.from_numpy(mu), torch.from_numpy(sigma), 50)
    with np.load(path) as f:
        assert set(f.files) >= {"mu", "sigma"} and int(f["n"]) == 50
    mu2, sigma2 = load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
