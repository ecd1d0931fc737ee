"""Fréchet distance (FID) from feature moments: a streaming float64 mean/covariance accumulator, the distance itself,
and the ``.npz`` layout of reference statistics (``mu``, ``sigma``, as pytorch-fid and clean-fid save them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class MomentAccumulator:
    """Mean and unbiased covariance (``np.cov(x, rowvar=False)``) of feature batches, merged batch by batch in float64
    with Chan et al.'s pairwise update, which keeps the centered sum of squares and never forms sum(x xᵀ) − n μμᵀ
    (a difference of two large numbers)."""

    def __init__(self, dim: int, device="cpu"):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().to(self.mean.device, torch.float64).reshape(features.shape[0], -1)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    @property
    def cov(self) -> torch.Tensor:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(sigma)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ (Heusel et al.), in float64.

    tr (Σ1 Σ2)^½ is the sum of the singular values of Σ2^½ Σ1^½ (its squares are the eigenvalues of Σ1 Σ2), with the
    PSD square roots from symmetric eigendecompositions. Unlike scipy's general ``sqrtm`` this cannot turn complex or
    NaN on the rank-deficient covariances of small sample sets, and unlike the square roots of eig(Σ1 Σ2) it does not
    inflate rounding noise in the null space (√1e-14 = 1e-7 per direction), so FID(x, x) is 0 to ~1e-12.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(torch.float64)
                        for v in (mu1, mu2, sigma1, sigma2))
    mu1, mu2, s2 = mu1.to(s1.device), mu2.to(s1.device), s2.to(s1.device)
    tr_covmean = torch.linalg.svdvals(_psd_sqrt(s2) @ _psd_sqrt(s1)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def save_stats(path: str | Path, mu, sigma, n: int) -> Path:
    """Reference statistics as clean-fid/pytorch-fid ``.npz`` (``mu``, ``sigma``) plus the sample count ``n``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_np = (lambda v: v.detach().cpu().numpy()) if torch.is_tensor(mu) else np.asarray
    np.savez(path, mu=to_np(mu).astype(np.float64), sigma=to_np(sigma).astype(np.float64), n=np.int64(n))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics {str(path)!r} do not exist")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"FID statistics {str(path)!r}: expected arrays 'mu' and 'sigma'")
        return f["mu"], f["sigma"]
