"""Shared fixtures for the diffusion math tests: every (schedule, target) pair and a Gaussian toy."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import SCHEDULES, TARGETS, Objective, get_schedule, get_target
from gmpipe.diffusion.times import expand_like

PAIRS = [(schedule, target) for schedule in SCHEDULES for target in TARGETS]


@pytest.fixture(params=PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def objective(request) -> Objective:
    """One Objective per (schedule, target) pair, default time density and weighting."""
    schedule, target = request.param
    return Objective(get_schedule(schedule), get_target(target))


class GaussianToy:
    """Data x ~ N(mu, diag(std^2)) in 2-D and the exact model for it.

    For x_t = a x + b z: E[x | x_t] = mu + a std^2 (x_t - a mu) / (a^2 std^2 + b^2) and
    E[z | x_t] = b (x_t - a mu) / (a^2 std^2 + b^2) (Gaussian conditioning, per dimension), so the exact
    prediction in any target is c E[x | x_t] + d E[z | x_t].
    """

    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    std = torch.tensor([0.5, 2.0], dtype=torch.float64)

    def model_fn(self, objective: Objective):
        def exact_prediction(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a = expand_like(objective.schedule.a(t), x_t)
            b = expand_like(objective.schedule.b(t), x_t)
            variance = a.square() * self.std.square() + b.square()
            x_hat = self.mu + a * self.std.square() * (x_t - a * self.mu) / variance
            z_hat = b * (x_t - a * self.mu) / variance
            return objective.from_data_and_noise(x_hat, z_hat, t)

        return exact_prediction

    def flow_map(self, objective: Objective, x_1: torch.Tensor) -> torch.Tensor:
        """Where the exact probability-flow ODE takes x_1: the monotone affine map from the true marginal
        N(a(1) mu, a(1)^2 std^2 + b(1)^2) at t = 1 to the data N(mu, std^2), per dimension. Equals
        mu + std x_1 when a(1) = 0, b(1) = 1; VP schedules stop slightly short of pure noise."""
        one = torch.ones(1, dtype=torch.float64)
        a_1, b_1 = objective.schedule.a(one), objective.schedule.b(one)
        scale_1 = (a_1.square() * self.std.square() + b_1.square()).sqrt()
        return self.mu + self.std * (x_1 - a_1 * self.mu) / scale_1


@pytest.fixture
def gaussian_toy() -> GaussianToy:
    return GaussianToy()
