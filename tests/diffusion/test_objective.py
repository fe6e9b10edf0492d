"""Objective: the 2x2 conversions for every (schedule, target) pair, the ODE velocity, the loss, configs."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import Objective, get_schedule, get_target, get_time_density, get_weighting
from gmpipe.diffusion.targets import determinant

INTERIOR_TIMES = [1e-3, 0.1, 0.5, 0.9, 1 - 1e-3]


def _draw(batch: int, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, generator=generator, dtype=dtype)
    z = torch.randn(batch, 4, 3, generator=generator, dtype=dtype)
    return x, z


def test_round_trip_at_interior_times(objective):
    x, z = _draw(len(INTERIOR_TIMES))
    t = torch.tensor(INTERIOR_TIMES, dtype=torch.float64)
    x_t = objective.interpolate(x, z, t)
    prediction = objective.target_value(x, z, t)
    x_hat, z_hat = objective.to_data_and_noise(prediction, x_t, t)
    torch.testing.assert_close(x_hat, x, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(z_hat, z, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(objective.from_data_and_noise(x_hat, z_hat, t), prediction)


def test_round_trip_at_the_ends_where_the_system_is_regular(objective):
    # at t = 0 and t = 1 the system is singular for data at b = 0 and for epsilon at a = 0; elsewhere exact
    x, z = _draw(2)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    regular = determinant(objective.schedule, objective.target, t).abs() > 1e-3
    x_t = objective.interpolate(x, z, t)
    x_hat, z_hat = objective.to_data_and_noise(objective.target_value(x, z, t), x_t, t)
    torch.testing.assert_close(x_hat[regular], x[regular], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(z_hat[regular], z[regular], rtol=1e-7, atol=1e-7)


def test_conversions_stay_finite_at_and_near_the_ends_in_float32(objective):
    x, z = _draw(6, dtype=torch.float32)
    t = torch.tensor([0.0, 1e-7, 1e-4, 1 - 1e-4, 1 - 1e-7, 1.0])
    x_t = objective.interpolate(x, z, t)
    # an imperfect prediction too: the guard must not turn model error into NaN or inf
    for prediction in (objective.target_value(x, z, t), objective.target_value(x, z, t) + 0.1):
        x_hat, z_hat = objective.to_data_and_noise(prediction, x_t, t)
        velocity = objective.velocity(prediction, x_t, t)
        for value in (x_hat, z_hat, velocity):
            assert torch.isfinite(value).all()


def test_endpoints_of_the_path(objective):
    x, z = _draw(1)
    assert torch.equal(objective.interpolate(x, z, 0.0), x)
    # exact for rectified flow and trigonometric; VP schedules keep a(1) <= 0.01 (see schedules.py)
    tolerance = 0.0 if objective.schedule.name in ("rectified_flow", "trigonometric") else 0.01
    assert (objective.interpolate(x, z, 1.0) - z).abs().max() <= tolerance * (x.abs().max() + z.abs().max())


def test_velocity_matches_finite_difference_of_the_path(objective):
    x, z = _draw(len(INTERIOR_TIMES))
    t = torch.tensor(INTERIOR_TIMES, dtype=torch.float64)
    x_t = objective.interpolate(x, z, t)
    velocity = objective.velocity(objective.target_value(x, z, t), x_t, t)
    h = 1e-7
    finite_difference = (objective.interpolate(x, z, t + h) - objective.interpolate(x, z, t - h)) / (2 * h)
    torch.testing.assert_close(velocity, finite_difference, rtol=1e-5, atol=1e-5)


def test_singular_epsilon_at_pure_noise_gives_zero_not_nan():
    # rectified flow at t = 1: x_t = z carries no information about x; the guarded solve returns 0 for both
    objective = Objective(get_schedule("rectified_flow"), get_target("epsilon"))
    x, z = _draw(1, dtype=torch.float32)
    x_hat, z_hat = objective.to_data_and_noise(z, z, 1.0)
    assert torch.equal(x_hat, torch.zeros_like(x)) and torch.equal(z_hat, torch.zeros_like(z))


def test_loss_is_zero_for_the_oracle_and_per_sample():
    objective = Objective(get_schedule("vp_linear"), get_target("epsilon"), weighting=get_weighting("min_snr"))
    x, noise = _draw(5, dtype=torch.float32)

    def oracle(x_t, t):
        return objective.target_value(x, noise, t)

    generator = torch.Generator().manual_seed(1)
    loss = objective.loss(oracle, x, noise=noise, generator=generator)
    assert loss.shape == (5,)
    assert torch.equal(loss, torch.zeros(5))


def test_loss_is_weighted_mse_against_the_target():
    objective = Objective(
        get_schedule("rectified_flow"), get_target("velocity"), weighting=get_weighting("min_snr", gamma=2.0)
    )
    x, noise = _draw(3, dtype=torch.float32)
    t = torch.tensor([0.2, 0.5, 0.8])
    loss = objective.loss(lambda x_t, t: torch.zeros_like(x_t), x, noise=noise, t=t)
    expected_mse = (noise - x).square().flatten(1).mean(1)
    expected_weight = objective.weighting.weight(objective.schedule, objective.target, t)
    torch.testing.assert_close(loss, expected_weight * expected_mse)


def test_loss_draws_time_then_noise_from_the_generator_and_passes_conditioning():
    objective = Objective(get_schedule("rectified_flow"), get_target("velocity"), get_time_density("logit_normal"))
    x, _ = _draw(4, dtype=torch.float32)
    seen = {}

    def model(x_t, t, labels):
        seen.update(x_t=x_t, t=t, labels=labels)
        return torch.zeros_like(x_t)

    labels = torch.arange(4)
    first = objective.loss(model, x, generator=torch.Generator().manual_seed(7), labels=labels)
    assert torch.equal(seen["labels"], labels)
    generator = torch.Generator().manual_seed(7)
    t = objective.time_density.sample(4, generator=generator)
    z = torch.randn(x.shape, generator=generator)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], objective.interpolate(x, z, t))
    second = objective.loss(model, x, generator=torch.Generator().manual_seed(7), labels=labels)
    assert torch.equal(first, second)


def test_config_round_trip_and_names():
    objective = Objective(
        get_schedule("vp_cosine", min_alpha_bar=1e-3),
        get_target("v_prediction"),
        get_time_density("logit_normal", mean=-0.5, std=1.2, shift=3.0),
        get_weighting("min_snr", gamma=4.0),
    )
    assert Objective.from_config(objective.to_config()) == objective
    short = Objective.from_config({"schedule": "rectified_flow", "target": "velocity"})
    assert short == Objective(get_schedule("rectified_flow"), get_target("velocity"))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"schedule": "rectified_flow"}, "needs a 'target'"),
        ({"schedule": "rectified_flow", "target": "velocity", "sampler": "euler"}, "unknown objective keys"),
        ({"schedule": "rectified_flow", "target": "x0"}, "unknown target 'x0'"),
        ({"schedule": "rectified_flow", "target": "data", "time_density": {"std": 1.0}}, "needs a 'name'"),
    ],
)
def test_bad_configs_name_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        Objective.from_config(config)
