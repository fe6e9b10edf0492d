"""Kernel distance (KID; Binkowski et al., 2018, "Demystifying MMD GANs").

KID is the unbiased estimate of the squared maximum mean discrepancy (Gretton et al., 2012, Lemma 6) between
two feature sets under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,        d = feature dimension,

averaged over random subsets of both sets. Unlike the Frechet distance it has an unbiased estimator, so values
from sets of different sizes are comparable and the expected value for two samples of one distribution is 0
(single estimates can be negative).
"""

from __future__ import annotations

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gram matrix (N, M) of k(x, y) = (x . y / d + 1)^3 for x (N, d) and y (M, d)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d) under ``polynomial_kernel``:

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n)
    """
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"need at least 2 samples on each side, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between features1 (N1, D) and features2 (N2, D): mean and std of ``mmd2_unbiased`` over subsets.

    Each of the ``n_subsets`` estimates draws ``subset_size`` rows of each set without replacement
    (``subset_size`` is capped at min(N1, N2)). The std is over subsets, a spread indicator rather than the
    standard error of the mean. Deterministic for a given ``seed``.
    """
    features1 = np.asarray(features1, dtype=np.float64)
    features2 = np.asarray(features2, dtype=np.float64)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"expected (N1, D) and (N2, D) features, got {features1.shape} and {features2.shape}")
    size = min(subset_size, len(features1), len(features2))
    rng = np.random.default_rng(seed)
    estimates = np.array(
        [
            mmd2_unbiased(
                features1[rng.choice(len(features1), size, replace=False)],
                features2[rng.choice(len(features2), size, replace=False)],
            )
            for _ in range(n_subsets)
        ]
    )
    return float(estimates.mean()), float(estimates.std())
