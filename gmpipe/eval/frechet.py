"""Frechet distance between Gaussians fitted to two feature sets.

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

the squared Frechet (2-Wasserstein) distance between N(mu_1, Sigma_1) and N(mu_2, Sigma_2) (Dowson & Landau,
1982), used as FID on Inception-v3 pool3 features by Heusel et al. (2017). gmpipe computes it on
EfficientNet-Lite0 features by default and reports it as FD-EffNetLite0 (see ``gmpipe.nn.features``).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

# Largest imaginary part tolerated on the diagonal of sqrtm(Sigma_1 Sigma_2) before the result is declared
# untrustworthy; smaller parts are round-off from a nearly singular product and are dropped.
_IMAGINARY_TOLERANCE = 1e-3


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"expected features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring equation).

    mu: (D,), sigma: (D, D). The matrix square root comes from ``scipy.linalg.sqrtm``. When the product of the
    covariances is singular (e.g. fewer samples than dimensions) sqrtm can return non-finite values; it is then
    recomputed with ``eps * I`` added to both covariances. A negligible imaginary part (round-off) is discarded;
    a large one raises ``ValueError``.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if largest_imaginary > _IMAGINARY_TOLERANCE:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {largest_imaginary:.3g}")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def trace_sqrt_product(features1: np.ndarray, features2: np.ndarray) -> float:
    """Tr((Sigma_1 Sigma_2)^(1/2)) of the sample covariances of features1 (N1, D) and features2 (N2, D), exactly.

    With A = (X_1 - mu_1) / sqrt(N1 - 1) and B likewise, Sigma_1 Sigma_2 = A^T A B^T B has the nonzero eigenvalues
    of (A B^T)(A B^T)^T, so the trace of its square root is the nuclear norm of A B^T (N1 x N2), or equivalently of
    Sigma_1^(1/2) Sigma_2^(1/2) (D x D). Whichever matrix is smaller is decomposed: no matrix square root, no
    complex round-off, and far faster than sqrtm when N < D.
    """
    x1 = np.asarray(features1, dtype=np.float64)
    x2 = np.asarray(features2, dtype=np.float64)
    a = (x1 - x1.mean(axis=0)) / np.sqrt(len(x1) - 1)
    b = (x2 - x2.mean(axis=0)) / np.sqrt(len(x2) - 1)
    if min(len(a), len(b)) <= a.shape[1]:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum())

    def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T

    return float(np.linalg.svd(psd_sqrt(a.T @ a) @ psd_sqrt(b.T @ b), compute_uv=False).sum())


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray, eps: float = 1e-6) -> float:
    """Squared Frechet distance between Gaussians fitted to features1 (N1, D) and features2 (N2, D).

    Same value as ``frechet_distance`` on the fitted statistics, computed through ``trace_sqrt_product``.
    ``eps`` is kept for signature compatibility; the exact route needs no regularisation.
    """
    mu1, trace1 = _mean_and_covariance_trace(features1)
    mu2, trace2 = _mean_and_covariance_trace(features2)
    diff = mu1 - mu2
    return float(diff @ diff + trace1 + trace2 - 2.0 * trace_sqrt_product(features1, features2))


def _mean_and_covariance_trace(features: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean (D,) and Tr(Sigma) of features (N, D), Sigma the unbiased covariance: the sum of the per-dimension
    variances, without the (D, D) matrix (``feature_statistics`` gives the same up to rounding)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"expected features of shape (N >= 2, D), got {features.shape}")
    mean = features.mean(axis=0)
    return mean, float(((features - mean) ** 2).sum() / (len(features) - 1))
