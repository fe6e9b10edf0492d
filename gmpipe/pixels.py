"""Pixel conventions, written once.

Images are stored as uint8 (N, C, H, W) in [0, 255] (prepared data, saved samples, grids) and seen by every
network as float32 (N, C, H, W) in the signed range [-1, 1]: x = pixel / 127.5 - 1.
"""

from __future__ import annotations

import numpy as np
import torch


def uint8_to_signed(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 (N, C, H, W) in [-1, 1], on the device the input is on."""
    return torch.as_tensor(images).float().div(127.5).sub(1.0)


def signed_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] (clipped) -> uint8 (N, C, H, W) on the CPU, rounded to the nearest level."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
