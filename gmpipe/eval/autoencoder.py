"""Autoencoder quality: PSNR, SSIM, KL and the Frechet distance of reconstructions, next to the real-data floor.

The floor is the same distance between two real sets (train vs test images, equal n) measured in the same run:
a reconstruction distance is only meaningful as a ratio to it (the Frechet distance is biased by n).
"""

from __future__ import annotations

import numpy as np
import torch

from gmpipe.eval.frechet import frechet_distance_from_features
from gmpipe.eval.reconstruction import psnr_per_image, ssim_per_image
from gmpipe.pixels import uint8_to_signed
from gmpipe.vae.elbo import kl_divergence


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu"):
    """Decode the posterior mean: images (N, C, H, W) in [-1, 1] -> (reconstructions, mean KL per image)."""
    outputs, kl_sum = [], 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        posterior = vae.encode(x).latent_dist
        outputs.append(vae.decode(posterior.mean).sample.clamp(-1, 1).cpu())
        kl_sum += float(kl_divergence(posterior.mean, posterior.logvar)) * len(x)
    return torch.cat(outputs), kl_sum / max(len(images), 1)


def autoencoder_metrics(vae, test_images: np.ndarray, train_images: np.ndarray, features, n: int,
                        seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Metrics on ``n`` test images (uint8 (N, C, H, W)); the floor uses ``n`` train images against them."""
    rng = np.random.default_rng(seed)
    n = min(n, len(test_images), len(train_images))
    test = uint8_to_signed(test_images[rng.choice(len(test_images), n, replace=False)])
    train = uint8_to_signed(train_images[rng.choice(len(train_images), n, replace=False)])
    reconstructions, kl = reconstruct(vae, test, batch_size, device)
    f_test = features.extract(test, batch_size=batch_size)
    fd_recon = frechet_distance_from_features(features.extract(reconstructions, batch_size=batch_size), f_test)
    fd_floor = frechet_distance_from_features(features.extract(train, batch_size=batch_size), f_test)
    return {
        "n": n,
        "psnr": float(psnr_per_image(reconstructions, test).clamp(max=100).mean()),
        "ssim": float(ssim_per_image(reconstructions, test).mean()) if min(test.shape[-2:]) >= 11 else float("nan"),
        "kl": kl,
        "fd_effnet_recon": fd_recon,
        "fd_effnet_floor": fd_floor,
        "fd_ratio": fd_recon / max(fd_floor, 1e-12),
    }
