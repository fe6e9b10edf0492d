"""Per-sample diffusion times: turning a float or (B,) time into coefficients that broadcast against x.

The time convention (t = 0 data, t = 1 noise) is written in the package docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_time(t: float | Tensor, x: Tensor) -> Tensor:
    """Per-sample times for the batch x (B, ...): a float or 0-d tensor is repeated; a (B,) tensor is kept.

    Returns a (B,) tensor with x's dtype and device.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time must be a float or a ({x.shape[0]},) tensor, got shape {tuple(t.shape)}")
    return t


def expand_like(coefficient: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient (B,) to (B, 1, ..., 1) so that it broadcasts against x (B, ...)."""
    return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim))
