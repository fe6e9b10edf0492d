"""Reconstruction metrics: PSNR and SSIM between image batches.

Images follow the gmpipe convention: float tensors in [-1, 1], shape (B, C, H, W). Both metrics are computed on
the [0, 1] scale (data range L = 1), per image, then averaged over the batch. Values are not clamped: clamp
reconstructions first to score them as they would be saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, (B,): 10 log10(L^2 / MSE) with L = 1 on the [0, 1] scale.

    Identical images give +inf (no cap), so the batch mean of a set containing one is +inf too.
    """
    _check_pair(x, y)
    mse = (((x.double() - y.double()) / 2.0) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the batch of ``psnr_per_image`` (dB)."""
    return psnr_per_image(x, y).mean().item()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size), float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    profile = torch.exp(-(coords**2) / (2.0 * sigma**2))
    profile = profile / profile.sum()
    return profile[:, None] * profile[None, :]


def ssim_per_image(
    x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """SSIM per image, (B,) (Wang et al., 2004, Eq. 13):

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    C1 = (k1 L)^2, C2 = (k2 L)^2, L = 1,

    with local statistics under a Gaussian window (11 x 11, sigma 1.5), evaluated per channel at every position
    where the window fits inside the image ('valid'), then averaged over positions and channels.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of size {tuple(x.shape[-2:])} are smaller than the {window_size}px SSIM window")
    channels = x.shape[1]
    x, y = (x.double() + 1.0) / 2.0, (y.double() + 1.0) / 2.0
    window = gaussian_window(window_size, sigma).to(x.device).expand(channels, 1, -1, -1)

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, window, groups=channels)  # depthwise: one window per channel

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the batch of ``ssim_per_image`` with the standard window and constants."""
    return ssim_per_image(x, y).mean().item()
