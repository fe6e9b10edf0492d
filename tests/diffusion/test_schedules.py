"""Schedules: endpoints, variance preservation, derivatives, the published formulas, the registry."""

from __future__ import annotations

import math

import pytest
import torch

from gmpipe.diffusion import SCHEDULES, get_schedule

ALL = list(SCHEDULES)
VARIANCE_PRESERVING = ["vp_linear", "vp_cosine", "trigonometric"]
INTERIOR = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)


@pytest.mark.parametrize("name", ALL)
def test_path_starts_exactly_at_data(name):
    schedule = get_schedule(name)
    zero = torch.zeros(3)
    assert torch.equal(schedule.a(zero), torch.ones(3))
    assert torch.equal(schedule.b(zero), torch.zeros(3))


@pytest.mark.parametrize("name", ["rectified_flow", "trigonometric"])
def test_path_ends_exactly_at_noise(name):
    schedule = get_schedule(name)
    one = torch.ones(3)
    assert torch.equal(schedule.a(one), torch.zeros(3))
    assert torch.equal(schedule.b(one), torch.ones(3))


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine"])
def test_vp_paths_end_just_short_of_noise(name):
    # documented in schedules.py: a(1) stays slightly above 0 to keep epsilon/data predictions invertible
    one = torch.ones(1, dtype=torch.float64)
    schedule = get_schedule(name)
    assert 0 < schedule.a(one).item() <= 0.01 + 1e-9
    assert schedule.b(one).item() >= 0.9999


@pytest.mark.parametrize("name", VARIANCE_PRESERVING)
def test_variance_preserving(name):
    schedule = get_schedule(name)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(schedule.a(t).square() + schedule.b(t).square(), torch.ones_like(t))


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_finite_differences(name):
    schedule = get_schedule(name)
    h = 1e-6
    for value, derivative in ((schedule.a, schedule.da), (schedule.b, schedule.db)):
        finite_difference = (value(INTERIOR + h) - value(INTERIOR - h)) / (2 * h)
        torch.testing.assert_close(derivative(INTERIOR), finite_difference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_coefficients_are_finite_at_both_ends_in_float32(name):
    schedule = get_schedule(name)
    t = torch.tensor([0.0, 1e-7, 1 - 1e-7, 1.0])
    for coefficient in (schedule.a, schedule.b, schedule.da, schedule.db, schedule.snr):
        assert torch.isfinite(coefficient(t)).all(), coefficient.__name__


def test_linear_vp_matches_discrete_ddpm_betas():
    # DDPM's 1000 betas from 1e-4 to 0.02 are beta(t) / 1000 for beta_min = 0.1, beta_max = 20
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    discrete_log_alpha_bar = torch.log1p(-betas).cumsum(0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    continuous_log_alpha_bar = 2 * get_schedule("vp_linear").a(t).log()
    torch.testing.assert_close(continuous_log_alpha_bar, discrete_log_alpha_bar, atol=0.05, rtol=0.01)


def test_cosine_follows_nichol_dhariwal_on_rescaled_time():
    schedule = get_schedule("vp_cosine", s=0.008, min_alpha_bar=1e-4)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    tau = schedule.tau_max * t

    def f(tau):
        return torch.cos((tau + 0.008) / 1.008 * math.pi / 2).square()

    torch.testing.assert_close(schedule.a(t).square(), f(tau) / f(torch.zeros(1, dtype=torch.float64)))
    assert schedule.a(torch.ones(1, dtype=torch.float64)).square().item() == pytest.approx(1e-4)
    assert 0.99 < schedule.tau_max < 1


def test_snr_decreases_from_data_to_noise():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for name in ALL:
        assert (get_schedule(name).snr(t).diff() < 0).all(), name


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip(name):
    schedule = get_schedule(name)
    assert get_schedule(**schedule.to_config()) == schedule


def test_registry_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'.*rectified_flow"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match="bad parameters for schedule 'vp_linear'"):
        get_schedule("vp_linear", beta=3.0)
    assert get_schedule("vp_linear", beta_max=10.0).beta_max == 10.0
