"""Reproducible random draws with an optional generator.

``generator`` is a ``torch.Generator`` (one stream for the whole batch) or a ``gmpipe.seeds.SampleNoise`` (one
stream per sample: row i of every draw comes from sample i's own seed). Draws happen on the generator's device and
are then moved, so a CPU generator gives the same numbers whether the model runs on CPU or GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmpipe.seeds import SampleNoise

Generator = torch.Generator | SampleNoise


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None):
    return generator.device if generator is not None else device


def standard_normal(
    shape: tuple[int, ...],
    *,
    generator: Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """z ~ N(0, I) of the given shape."""
    if isinstance(generator, SampleNoise):
        z = generator.randn(shape, dtype=dtype)
        return z.to(device) if device is not None else z
    z = torch.randn(shape, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return z.to(device) if device is not None else z


def standard_uniform(
    shape: tuple[int, ...],
    *,
    generator: Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """u ~ U[0, 1) of the given shape."""
    if isinstance(generator, SampleNoise):
        u = generator.rand(shape, dtype=dtype)
        return u.to(device) if device is not None else u
    u = torch.rand(shape, generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return u.to(device) if device is not None else u
