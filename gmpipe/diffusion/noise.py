"""Reproducible random draws with an optional torch.Generator.

Draws happen on the generator's device and are then moved, so a CPU generator gives the same numbers
whether the model runs on CPU or GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None):
    return generator.device if generator is not None else device


def standard_normal(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """z ~ N(0, I) of the given shape."""
    z = torch.randn(shape, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return z.to(device) if device is not None else z


def standard_uniform(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """u ~ U[0, 1) of the given shape."""
    u = torch.rand(shape, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return u.to(device) if device is not None else u
