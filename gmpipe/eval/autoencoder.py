"""Autoencoder quality: PSNR, SSIM, KL and the Frechet distance of reconstructions, next to the real-data floor.

The floor is the same distance between two real sets (train vs test images, equal n) measured in the same run:
a reconstruction distance is only meaningful as a ratio to it (the Frechet distance is biased by n).
"""

from __future__ import annotations

import numpy as np
import torch

from gmpipe.eval.frechet import frechet_distance_from_features
from gmpipe.eval.reconstruction import psnr_per_image, ssim_per_image
from gmpipe.nn.autoencoder import autoencoder_passes
from gmpipe.pixels import uint8_to_signed
from gmpipe.vae.elbo import kl_divergence


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu"):
    """Decode the posterior mean: images (N, C, H, W) in [-1, 1] -> (reconstructions, mean KL per image)."""
    outputs, kl_sum = [], 0.0
    for start in range(0, len(images), batch_size):
        for x in autoencoder_passes(images[start : start + batch_size].to(device), device):
            posterior = vae.encode(x).latent_dist
            outputs.append(vae.decode(posterior.mean).sample.clamp(-1, 1).cpu())
            kl_sum += float(kl_divergence(posterior.mean, posterior.logvar)) * len(x)
    return torch.cat(outputs), kl_sum / max(len(images), 1)


def autoencoder_selection(n_test: int, n_train: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indexes of the ``n`` test images (n,) the metrics are computed on and of the ``n`` train images (n,) of their
    floor (n cut to the smaller split): a seeded choice without replacement."""
    rng = np.random.default_rng(seed)
    n = min(n, n_test, n_train)
    return rng.choice(n_test, n, replace=False), rng.choice(n_train, n, replace=False)


def autoencoder_metrics(vae, test_images: np.ndarray, train_images: np.ndarray, features, n: int,
                        seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
                        real_features: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Metrics on ``n`` test images (uint8 (N, C, H, W)); the floor uses ``n`` train images against them.
    ``real_features``: the features (n, D) of the chosen test and train images (``autoencoder_selection``), when
    they were computed before."""
    test_index, train_index = autoencoder_selection(len(test_images), len(train_images), n, seed)
    n = len(test_index)
    test = uint8_to_signed(test_images[test_index])
    reconstructions, kl = reconstruct(vae, test, batch_size, device)
    if real_features is None:
        real_features = (features.extract(test), features.extract(uint8_to_signed(train_images[train_index])))
    f_test, f_train = real_features
    if len(f_test) != n or len(f_train) != n:
        raise ValueError(f"real features for {len(f_test)} test and {len(f_train)} train images; expected {n} each")
    fd_recon = frechet_distance_from_features(features.extract(reconstructions), f_test)
    fd_floor = frechet_distance_from_features(f_train, f_test)
    return {
        "n": n,
        "psnr": float(psnr_per_image(reconstructions, test).clamp(max=100).mean()),
        "ssim": float(ssim_per_image(reconstructions, test).mean()) if min(test.shape[-2:]) >= 11 else float("nan"),
        "kl": kl,
        "fd_effnet_recon": fd_recon,
        "fd_effnet_floor": fd_floor,
        "fd_ratio": fd_recon / max(fd_floor, 1e-12),
    }
