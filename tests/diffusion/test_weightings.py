"""Weightings: Min-SNR-gamma against Hang et al.'s closed forms, finiteness, the data-space identity."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import Objective, get_schedule, get_target, get_weighting

T = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)


@pytest.mark.parametrize("schedule_name", ["vp_linear", "vp_cosine", "trigonometric"])
def test_min_snr_matches_hang_et_al_on_vp_paths(schedule_name):
    schedule = get_schedule(schedule_name)
    weighting = get_weighting("min_snr", gamma=5.0)
    snr = schedule.snr(T)
    clipped = snr.clamp_max(5.0)
    expected = {"epsilon": clipped / snr, "data": clipped, "v_prediction": clipped / (snr + 1)}
    for target_name, closed_form in expected.items():
        torch.testing.assert_close(weighting.weight(schedule, get_target(target_name), T), closed_form)


def test_min_snr_weights_data_space_error_for_any_target(objective):
    # w_y ||y_hat - y||^2 == min(SNR, gamma) ||x_hat - x||^2 for a prediction error at fixed x_t
    generator = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, len(T), 3, generator=generator, dtype=torch.float64)
    error = 0.1 * torch.randn(len(T), 3, generator=generator, dtype=torch.float64)
    x_t = objective.interpolate(x, z, T)
    prediction = objective.target_value(x, z, T) + error
    x_hat, _ = objective.to_data_and_noise(prediction, x_t, T)
    weighting = get_weighting("min_snr", gamma=5.0)
    target_space = weighting.weight(objective.schedule, objective.target, T) * error.square().sum(1)
    data_space = objective.schedule.snr(T).clamp_max(5.0) * (x_hat - x).square().sum(1)
    torch.testing.assert_close(target_space, data_space, rtol=1e-6, atol=1e-9)


def test_weights_are_finite_and_nonnegative_at_the_ends(objective):
    t = torch.tensor([0.0, 1e-7, 0.5, 1 - 1e-7, 1.0])
    for name in ("uniform", "min_snr"):
        weight = get_weighting(name).weight(objective.schedule, objective.target, t)
        assert torch.isfinite(weight).all() and (weight >= 0).all()


def test_uniform_is_one():
    objective = Objective(get_schedule("rectified_flow"), get_target("velocity"))
    torch.testing.assert_close(get_weighting("uniform").weight(objective.schedule, objective.target, T), T * 0 + 1)
