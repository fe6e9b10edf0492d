"""Loss weightings w(t): the per-sample factor on the target-space MSE ||model(x_t, t) - y||^2.

Error conversion used below: at a fixed x_t, a prediction error e_y = y_hat - y in target space equals
-(det / b) e_x, where e_x = x_hat - x is the error of the implied data prediction and det = a d - b c
(because z_hat - z = -(a / b) e_x). A weight w_x on the data-space MSE therefore becomes
w_y = w_x b^2 / det^2 on the target-space MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gmpipe.diffusion.schedules import Schedule
from gmpipe.diffusion.targets import MIN_DETERMINANT, Target, determinant
from gmpipe.registry import WEIGHTINGS


class Weighting:
    """Base class: w(t) >= 0 multiplying the per-sample target-space MSE."""

    @property
    def name(self) -> str:
        """The name this weighting is registered under (``gmpipe.registry.WEIGHTINGS``)."""
        return WEIGHTINGS.name_of(self)

    def weight(self, schedule: Schedule, target: Target, t: Tensor) -> Tensor:
        """w(t), shaped like t."""
        raise NotImplementedError

    def to_config(self) -> dict:
        return WEIGHTINGS.config_of(self)


@dataclass(frozen=True)
class UniformWeighting(Weighting):
    """w(t) = 1: plain MSE on the target."""

    def weight(self, schedule: Schedule, target: Target, t: Tensor) -> Tensor:
        return torch.ones_like(t)


@dataclass(frozen=True)
class MinSNRWeighting(Weighting):
    """Min-SNR-gamma (Hang et al. 2023): weight the implied data-space error by min(SNR(t), gamma).

    In target space w(t) = min(SNR, gamma) b^2 / det^2 = min(a^2, gamma b^2) / det^2, which is Hang et al.'s
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) for data and min(SNR, gamma) / (SNR + 1) for
    v-prediction on VP paths, and extends the same idea to any (schedule, target) pair. det^2 is clamped at
    MIN_DETERMINANT^2, so at an exactly singular point (epsilon at a = 0, data at b = 0) w is 0, not NaN.
    """

    gamma: float = 5.0

    def weight(self, schedule: Schedule, target: Target, t: Tensor) -> Tensor:
        a, b = schedule.a(t), schedule.b(t)
        det_squared = determinant(schedule, target, t).square().clamp_min(MIN_DETERMINANT**2)
        return torch.minimum(a.square(), self.gamma * b.square()) / det_squared


def get_weighting(name: str, **params: float) -> Weighting:
    """The weighting registered as `name` ("uniform", "min_snr")."""
    return WEIGHTINGS.create(name, **params)
