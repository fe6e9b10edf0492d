"""Schedules: the Gaussian path x_t = a(t) x + b(t) z from data (t = 0) to noise (t = 1).

A schedule is a frozen value object with four elementwise maps from a time tensor t (any shape, values in
[0, 1]) to a tensor of the same shape and dtype: a(t), b(t) and their time derivatives da = a'(t),
db = b'(t). The derivatives give the probability-flow velocity dx_t/dt = a'(t) x + b'(t) z that the ODE
samplers integrate.

Endpoints: every schedule has a(0) = 1, b(0) = 0. Rectified flow and trigonometric reach a(1) = 0,
b(1) = 1 exactly. The variance-preserving ones stop just short of pure noise on purpose (a(1) = 0.0066 for
linear beta 0.1..20, a(1) = 0.01 for the cosine with min_alpha_bar = 1e-4), which keeps the epsilon and
data parameterizations invertible at t = 1, as DDPM's finite beta_max and Nichol & Dhariwal's beta clipping do.
Their b'(t) is singular at t = 0 (b ~ sqrt(t)); b is clamped at MIN_NOISE_SCALE where it divides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gmpipe.registry import SCHEDULES

MIN_NOISE_SCALE = 1e-6  # smallest b used as a divisor (b'(t) of VP schedules, a/b in SNR-type ratios)


class Schedule:
    """Base class: the coefficients of x_t = a(t) x + b(t) z and their time derivatives."""

    @property
    def name(self) -> str:
        """The name this schedule is registered under (``gmpipe.registry.SCHEDULES``)."""
        return SCHEDULES.name_of(self)

    def a(self, t: Tensor) -> Tensor:
        """Signal scale a(t)."""
        raise NotImplementedError

    def b(self, t: Tensor) -> Tensor:
        """Noise scale b(t)."""
        raise NotImplementedError

    def da(self, t: Tensor) -> Tensor:
        """Time derivative a'(t)."""
        raise NotImplementedError

    def db(self, t: Tensor) -> Tensor:
        """Time derivative b'(t)."""
        raise NotImplementedError

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio SNR(t) = a(t)^2 / b(t)^2 (Kingma et al. 2021); b clamped away from 0."""
        return self.a(t).square() / self.b(t).clamp_min(MIN_NOISE_SCALE).square()

    def to_config(self) -> dict:
        """{"name": ..., **parameters}; `get_schedule(**config)` rebuilds the schedule."""
        return SCHEDULES.config_of(self)


@dataclass(frozen=True)
class RectifiedFlow(Schedule):
    """Rectified flow / flow matching with the linear path (Liu et al. 2022; Lipman et al. 2023):
    a(t) = 1 - t, b(t) = t."""

    def a(self, t: Tensor) -> Tensor:
        return 1 - t

    def b(self, t: Tensor) -> Tensor:
        return t.clone()

    def da(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def db(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


@dataclass(frozen=True)
class VPLinear(Schedule):
    """DDPM variance-preserving schedule with linear beta, in continuous time (Ho et al. 2020;
    the VP SDE of Song et al. 2021): beta(t) = beta_min + t (beta_max - beta_min),
    alpha_bar(t) = exp(-integral_0^t beta), a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """B(t) = integral_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2, so alpha_bar = exp(-B)."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t.square()

    def a(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.integrated_beta(t))

    def b(self, t: Tensor) -> Tensor:
        # 1 - alpha_bar via expm1: exact to float precision near t = 0
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def da(self, t: Tensor) -> Tensor:
        """a' = -beta a / 2."""
        return -0.5 * self.beta(t) * self.a(t)

    def db(self, t: Tensor) -> Tensor:
        """b' = -a a' / b (from a^2 + b^2 = 1); singular at t = 0, where b is clamped."""
        return -self.a(t) * self.da(t) / self.b(t).clamp_min(MIN_NOISE_SCALE)


@dataclass(frozen=True)
class VPCosine(Schedule):
    """Variance-preserving cosine schedule (Nichol & Dhariwal 2021, eq. 17):
    alpha_bar = f(tau) / f(0), f(tau) = cos^2(theta(tau)), theta(tau) = (tau + s) / (1 + s) * pi / 2,
    a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar).

    The curve is evaluated at tau = tau_max * t, with tau_max < 1 chosen so that alpha_bar(t = 1) =
    min_alpha_bar: a smooth time rescaling that keeps a(1) > 0 (the curve itself reaches a = 0 at tau = 1,
    where epsilon prediction carries no information about x)."""

    s: float = 0.008
    min_alpha_bar: float = 1e-4

    @property
    def theta_0(self) -> float:
        return self.s / (1 + self.s) * math.pi / 2

    @property
    def tau_max(self) -> float:
        """The tau with alpha_bar(tau) = min_alpha_bar."""
        theta_max = math.acos(math.sqrt(self.min_alpha_bar) * math.cos(self.theta_0))
        return theta_max * 2 / math.pi * (1 + self.s) - self.s

    def theta(self, t: Tensor) -> Tensor:
        """theta = (tau_max t + s) / (1 + s) * pi / 2."""
        return (self.tau_max * t + self.s) / (1 + self.s) * (math.pi / 2)

    def a(self, t: Tensor) -> Tensor:
        return torch.cos(self.theta(t)) / math.cos(self.theta_0)

    def b(self, t: Tensor) -> Tensor:
        # 1 - a^2 = (cos^2 theta_0 - cos^2 theta) / cos^2 theta_0
        #         = sin(theta - theta_0) sin(theta + theta_0) / cos^2 theta_0, without cancellation near t = 0
        # theta - theta_0 from t directly, so that b(0) = 0 exactly in float32
        theta_minus_theta_0 = self.tau_max * t / (1 + self.s) * (math.pi / 2)
        one_minus_a2 = torch.sin(theta_minus_theta_0) * torch.sin(theta_minus_theta_0 + 2 * self.theta_0)
        return torch.sqrt(one_minus_a2.clamp_min(0)) / math.cos(self.theta_0)

    def da(self, t: Tensor) -> Tensor:
        """a' = -sin(theta) theta' / cos(theta_0), theta' = tau_max / (1 + s) * pi / 2."""
        dtheta = self.tau_max / (1 + self.s) * (math.pi / 2)
        return -torch.sin(self.theta(t)) * dtheta / math.cos(self.theta_0)

    def db(self, t: Tensor) -> Tensor:
        """b' = -a a' / b (from a^2 + b^2 = 1); singular at t = 0, where b is clamped."""
        return -self.a(t) * self.da(t) / self.b(t).clamp_min(MIN_NOISE_SCALE)


@dataclass(frozen=True)
class Trigonometric(Schedule):
    """Trigonometric path a(t) = cos(pi t / 2), b(t) = sin(pi t / 2) (variance preserving, reaches pure
    noise at t = 1; the natural path for v-prediction, Salimans & Ho 2022)."""

    # a is written as sin(pi (1 - t) / 2) so that a(1) = 0 exactly in floating point, like b(0) = 0

    def a(self, t: Tensor) -> Tensor:
        return torch.sin((1 - t) * (math.pi / 2))

    def b(self, t: Tensor) -> Tensor:
        return torch.sin(t * (math.pi / 2))

    def da(self, t: Tensor) -> Tensor:
        return -(math.pi / 2) * torch.cos((1 - t) * (math.pi / 2))

    def db(self, t: Tensor) -> Tensor:
        return (math.pi / 2) * torch.cos(t * (math.pi / 2))


def get_schedule(name: str, **params: float) -> Schedule:
    """The schedule registered as `name` ("rectified_flow", "vp_linear", "vp_cosine", "trigonometric")."""
    return SCHEDULES.create(name, **params)
