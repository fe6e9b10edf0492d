"""Targets: the named closed forms and the velocity target as the time derivative of the path."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import SCHEDULES, Objective, get_schedule, get_target
from gmpipe.diffusion.targets import determinant, guard_determinant

GENERATOR_SEED = 0


def _data_and_noise(batch: int = 4, dtype=torch.float64):
    generator = torch.Generator().manual_seed(GENERATOR_SEED)
    x = torch.randn(batch, 3, 2, generator=generator, dtype=dtype)
    z = torch.randn(batch, 3, 2, generator=generator, dtype=dtype)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=dtype)
    return x, z, t


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_named_targets(schedule_name):
    x, z, t = _data_and_noise()
    schedule = get_schedule(schedule_name)
    a, b = schedule.a(t)[:, None, None], schedule.b(t)[:, None, None]

    def target(name):
        return Objective(schedule, get_target(name)).target_value(x, z, t)

    torch.testing.assert_close(target("epsilon"), z)
    torch.testing.assert_close(target("data"), x)
    torch.testing.assert_close(target("v_prediction"), a * z - b * x)


def test_rectified_flow_velocity_is_noise_minus_data():
    x, z, t = _data_and_noise()
    objective = Objective(get_schedule("rectified_flow"), get_target("velocity"))
    torch.testing.assert_close(objective.target_value(x, z, t), z - x)


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_velocity_target_is_the_time_derivative_of_the_path(schedule_name):
    x, z, t = _data_and_noise()
    objective = Objective(get_schedule(schedule_name), get_target("velocity"))
    h = 1e-6
    finite_difference = (objective.interpolate(x, z, t + h) - objective.interpolate(x, z, t - h)) / (2 * h)
    torch.testing.assert_close(objective.target_value(x, z, t), finite_difference, rtol=1e-6, atol=1e-6)


def test_v_prediction_determinant_is_one_on_vp_paths():
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    for name in ("vp_linear", "vp_cosine", "trigonometric"):
        det = determinant(get_schedule(name), get_target("v_prediction"), t)
        torch.testing.assert_close(det, torch.ones_like(t))


def test_guard_determinant_keeps_sign_and_clamps_magnitude():
    det = torch.tensor([-2.0, -1e-9, 0.0, 1e-9, 3.0])
    guarded = guard_determinant(det, eps=1e-6)
    torch.testing.assert_close(guarded, torch.tensor([-2.0, -1e-6, 1e-6, 1e-6, 3.0]))
