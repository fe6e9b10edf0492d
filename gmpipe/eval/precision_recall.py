"""Improved precision and recall (Kynkaanniemi et al., 2019).

Each feature set estimates its distribution's support as a union of balls: around every sample a ball whose
radius is the distance to its k-th nearest neighbour in the same set. With

    f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)|| for some phi' in Phi, else 0,

    precision = mean over generated phi_g of f(phi_g, Phi_real)   (samples that look real: fidelity)
    recall    = mean over real phi_r of f(phi_r, Phi_generated)   (real modes the generator covers)

A collapsed generator keeps precision high and loses recall; a generator spraying samples outside the data
keeps recall and loses precision. Distances are computed in torch, batched over rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    features = torch.as_tensor(features, dtype=torch.float64)
    if features.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {tuple(features.shape)}")
    return features


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance from each row of features (N, D) to its k-th nearest other row: radii (N,)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must satisfy 1 <= k < N = {len(features)}, got {k}")
    radii = []
    for start in range(0, len(features), batch_size):
        distances = torch.cdist(features[start : start + batch_size], features)
        # Position k+1 in sorted order: each row's own zero distance comes first.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int = 1024
) -> float:
    """Fraction of queries (N, D) inside at least one ball (support (M, D), radii (M,)): mean of f above."""
    inside = []
    for start in range(0, len(queries), batch_size):
        distances = torch.cdist(queries[start : start + batch_size], support)  # (batch, M)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    generated_features: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 1024,
) -> PrecisionRecall:
    """Improved precision and recall of generated_features (M, D) against real_features (N, D), k-NN radii.

    Precision is ``manifold_coverage(generated, real, real radii)`` and recall ``manifold_coverage(real, generated,
    generated radii)``; both read the same generated-to-real distances, so each block of them is computed once and
    serves both (the same values up to float rounding at a ball's boundary)."""
    real, generated = _as_tensor(real_features), _as_tensor(generated_features)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {generated.shape[1]}")
    real_radii, generated_radii = knn_radii(real, k, batch_size), knn_radii(generated, k, batch_size)
    looks_real, covered = [], torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(generated), batch_size):
        distances = torch.cdist(generated[start : start + batch_size], real)  # (batch, N)
        looks_real.append((distances <= real_radii[None, :]).any(dim=1))
        covered |= (distances <= generated_radii[start : start + batch_size, None]).any(dim=0)
    return PrecisionRecall(torch.cat(looks_real).double().mean().item(), covered.double().mean().item())
