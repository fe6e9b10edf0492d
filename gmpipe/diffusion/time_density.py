"""Time densities p(t) for training: where on [0, 1] the loss is evaluated, plus the resolution shift.

A density is a frozen value object with `sample(batch_size, generator=..., device=..., dtype=...) -> (B,)`.
Any density composes with the resolution shift through `ShiftedTime(base, shift)`, which `get_time_density`
builds when given shift != 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gmpipe.diffusion.noise import standard_normal, standard_uniform
from gmpipe.registry import TIME_DENSITIES


def resolution_shift(t: Tensor, shift: float) -> Tensor:
    """t' = s t / (1 + (s - 1) t), the resolution-dependent timestep shift of Esser et al. 2024 (SD3).

    Monotone on [0, 1] with 0 -> 0 and 1 -> 1 for any s > 0; s > 1 moves times toward noise (more noise for
    larger images, whose pixels are more redundant), s = 1 is the identity. Shapes: t' shaped like t.
    """
    if shift <= 0:
        raise ValueError(f"resolution shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_logit_normal(
    batch_size: int,
    mean: float,
    std: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """t = sigmoid(m + s n), n ~ N(0, 1): logit-normal time sampling (Esser et al. 2024). Returns (B,)."""
    n = standard_normal((batch_size,), generator=generator, device=device, dtype=dtype)
    return torch.sigmoid(mean + std * n)


class TimeDensity:
    """Base class: a distribution over t in [0, 1]."""

    @property
    def name(self) -> str:
        """The name this time density is registered under (``gmpipe.registry.TIME_DENSITIES``)."""
        return TIME_DENSITIES.name_of(self)

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """(B,) times drawn from the density."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        return TIME_DENSITIES.config_of(self)


@dataclass(frozen=True)
class UniformTime(TimeDensity):
    """t ~ U[0, 1)."""

    def sample(self, batch_size, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        return standard_uniform((batch_size,), generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class LogitNormalTime(TimeDensity):
    """t = sigmoid(mean + std n), n ~ N(0, 1); mean 0, std 1 is SD3's default."""

    mean: float = 0.0
    std: float = 1.0

    def sample(self, batch_size, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        return sample_logit_normal(batch_size, self.mean, self.std, generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class ShiftedTime(TimeDensity):
    """A base density followed by the resolution shift: t' = resolution_shift(t, shift), t ~ base."""

    base: TimeDensity
    shift: float

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"resolution shift must be positive, got {self.shift}")

    def sample(self, batch_size, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
        t = self.base.sample(batch_size, generator=generator, device=device, dtype=dtype)
        return resolution_shift(t, self.shift)

    @property
    def name(self) -> str:
        return self.base.name

    def to_config(self) -> dict[str, Any]:
        """The base density's config with a "shift" key."""
        return {**self.base.to_config(), "shift": self.shift}


def get_time_density(name: str, shift: float = 1.0, **params: float) -> TimeDensity:
    """The density registered as `name` ("uniform", "logit_normal"), shifted when shift != 1."""
    density = TIME_DENSITIES.create(name, **params)
    return density if shift == 1.0 else ShiftedTime(density, shift)
