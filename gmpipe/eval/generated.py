"""Metrics of a set of generated images against one real reference set: FD, KID, precision/recall, accuracy.

The reference holds the real test images' features once, so every model, sampler, step count and guidance
weight is measured against the same n real images in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gmpipe.eval.classifier import accuracy
from gmpipe.eval.frechet import frechet_distance_from_features
from gmpipe.eval.kid import kernel_distance
from gmpipe.eval.precision_recall import precision_recall


@dataclass
class Reference:
    """Real images' features (N, D) and, for conditional models, a classifier trained on real train images."""

    features: np.ndarray
    extractor: object
    classifier: torch.nn.Module | None = None
    extra: dict | None = None  # name -> (extractor, features) for more distances (true FID)
    kid_subsets: int = 50
    pr_k: int = 3
    batch_size: int = 250

    def subset(self, n: int) -> np.ndarray:
        return self.features[:n]

    def extract(self, images: torch.Tensor) -> np.ndarray:
        """Features (n, D) of images (n, C, H, W) in [-1, 1], from the network the reference features came from."""
        return self.extractor.extract(images, batch_size=self.batch_size)

    def measure(self, images: torch.Tensor, labels: torch.Tensor | None = None, with_pr: bool = True,
                features: np.ndarray | None = None) -> dict:
        """images (n, C, H, W) in [-1, 1]; the reference is cut to the same n. ``features``: the images' features
        (n, D) from ``extract``, when they were computed before."""
        n = len(images)
        if n > len(self.features):
            raise ValueError(f"{n} generated images but only {len(self.features)} reference images")
        if features is not None and len(features) != n:
            raise ValueError(f"{len(features)} features for {n} images")
        generated = self.extract(images) if features is None else features
        real = self.subset(n)
        result = {"n": n, "fd_effnet": frechet_distance_from_features(generated, real)}
        # Subsets of half the set (at most 1,000) so that the spread over subsets means something.
        kid_mean, kid_std = kernel_distance(generated, real, n_subsets=self.kid_subsets,
                                            subset_size=max(2, min(n // 2, 1000)))
        result.update(kid=kid_mean, kid_std=kid_std)
        if with_pr:
            pr = precision_recall(real, generated, k=self.pr_k)
            result.update(precision=float(pr.precision), recall=float(pr.recall))
        if self.classifier is not None and labels is not None:
            result["accuracy"] = accuracy(self.classifier, images, labels)
        for name, (extractor, features) in (self.extra or {}).items():
            result[name] = frechet_distance_from_features(extractor.extract(images, batch_size=self.batch_size),
                                                          features[:n])
        return result
