"""Targets: what the network predicts, y = c(t) x + d(t) z, as a function of the schedule.

Together with x_t = a x + b z this gives the 2x2 view [[a, b], [c, d]] [x, z]^T = [x_t, y]^T that converts
any prediction into any other (objective.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gmpipe.diffusion.schedules import Schedule
from gmpipe.registry import TARGETS


class Target:
    """Base class: the coefficients (c(t), d(t)) of the target y = c x + d z."""

    @property
    def name(self) -> str:
        """The name this target is registered under (``gmpipe.registry.TARGETS``)."""
        return TARGETS.name_of(self)

    def coefficients(self, schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
        """(c(t), d(t)), each shaped like t."""
        raise NotImplementedError

    def to_config(self) -> dict:
        return TARGETS.config_of(self)


@dataclass(frozen=True)
class Epsilon(Target):
    """Noise prediction (Ho et al. 2020): y = z, (c, d) = (0, 1)."""

    def coefficients(self, schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), torch.ones_like(t)


@dataclass(frozen=True)
class Data(Target):
    """Data (x0) prediction: y = x, (c, d) = (1, 0)."""

    def coefficients(self, schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), torch.zeros_like(t)


@dataclass(frozen=True)
class Velocity(Target):
    """Flow-matching velocity, the time derivative of the path (Lipman et al. 2023):
    y = dx_t/dt = a'(t) x + b'(t) z, (c, d) = (a', b'). For rectified flow y = z - x."""

    def coefficients(self, schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
        return schedule.da(t), schedule.db(t)


@dataclass(frozen=True)
class VPrediction(Target):
    """v-prediction (Salimans & Ho 2022, defined there for VP paths): y = a z - b x, (c, d) = (-b, a).
    Its 2x2 determinant a^2 + b^2 never vanishes, so it converts stably at both ends."""

    def coefficients(self, schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
        return -schedule.b(t), schedule.a(t)


def get_target(name: str) -> Target:
    """The target registered as `name` ("epsilon", "data", "velocity", "v_prediction")."""
    return TARGETS.create(name)


MIN_DETERMINANT = 1e-6  # |det| is clamped at this where the (x, z) <-> (x_t, y) map is singular


def determinant(schedule: Schedule, target: Target, t: Tensor) -> Tensor:
    """det = a d - b c of [[a, b], [c, d]], shaped like t. Zero where y and x_t carry the same information
    (e.g. epsilon at a = 0, data at b = 0)."""
    a, b = schedule.a(t), schedule.b(t)
    c, d = target.coefficients(schedule, t)
    return a * d - b * c


def guard_determinant(det: Tensor, eps: float = MIN_DETERMINANT) -> Tensor:
    """det with |det| clamped to >= eps, keeping its sign (0 counts as positive)."""
    sign = torch.where(det < 0, -torch.ones_like(det), torch.ones_like(det))
    return sign * det.abs().clamp_min(eps)
