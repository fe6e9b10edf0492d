"""Samplers on a Gaussian toy with the exact model (closed-form E[x | x_t]), NFE counts, the time grid."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import SAMPLERS, Objective, get_sampler, get_schedule, get_target, make_guided_model_fn
from gmpipe.diffusion.samplers import euler_step, time_grid

# pairs whose 2x2 system is regular on (0, 1]: epsilon is left out for paths with a(1) = 0 (singular there)
TOY_PAIRS = [
    ("rectified_flow", "velocity"),
    ("rectified_flow", "data"),
    ("vp_linear", "epsilon"),
    ("vp_linear", "velocity"),
    ("vp_cosine", "v_prediction"),
    ("trigonometric", "v_prediction"),
]
# (sampler, steps, tolerance on mean and std): Euler and DDIM are first order, Heun second order
DETERMINISTIC = [("euler", 200, 0.02), ("heun", 50, 0.01), ("ddim", 200, 0.03)]


def _objective(schedule: str, target: str) -> Objective:
    return Objective(get_schedule(schedule), get_target(target))


@pytest.mark.parametrize("sampler_name, steps, tolerance", DETERMINISTIC)
@pytest.mark.parametrize("schedule, target", TOY_PAIRS)
def test_deterministic_samplers_land_on_the_gaussian(gaussian_toy, schedule, target, sampler_name, steps, tolerance):
    # with the exact (affine) model the sampler is an affine map of the noise, per dimension; feeding
    # x_1 = 0 and x_1 = unit vectors reads off its offset (the sample mean) and its slopes (the sample std)
    objective = _objective(schedule, target)
    noise = torch.cat([torch.zeros(1, 2), torch.eye(2)]).to(torch.float64)
    samples, _ = get_sampler(sampler_name)(gaussian_toy.model_fn(objective), objective, noise, steps)
    mean, std = samples[0], torch.diagonal(samples[1:] - samples[0])
    exact = gaussian_toy.flow_map(objective, noise)
    exact_mean, exact_std = exact[0], torch.diagonal(exact[1:] - exact[0])
    torch.testing.assert_close(mean, exact_mean, atol=tolerance * gaussian_toy.std.max().item(), rtol=0)
    torch.testing.assert_close(std, exact_std, rtol=tolerance, atol=0)
    # and the exact flow lands on the data distribution, up to the VP schedules' a(1) <= 0.01
    torch.testing.assert_close(exact_mean, gaussian_toy.mu, atol=0.03, rtol=0)
    torch.testing.assert_close(exact_std, gaussian_toy.std, rtol=1e-3, atol=0)


@pytest.mark.parametrize("schedule, target", [("rectified_flow", "velocity"), ("vp_linear", "epsilon")])
def test_ddpm_ancestral_sampler_lands_on_the_gaussian(gaussian_toy, schedule, target):
    objective = _objective(schedule, target)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, generator=generator, dtype=torch.float64)
    samples, nfe = get_sampler("ddpm")(gaussian_toy.model_fn(objective), objective, noise, 200, generator=generator)
    assert nfe == 200
    # standard errors with 4000 samples: 1.6% of std for the mean, 1.1% for the std; 200 DDPM steps add
    # a bias of up to ~3% (the x_hat in the update is the posterior mean, not a posterior sample)
    torch.testing.assert_close(samples.mean(0), gaussian_toy.mu, atol=0.06 * gaussian_toy.std.max().item(), rtol=0)
    torch.testing.assert_close(samples.std(0), gaussian_toy.std, rtol=0.06, atol=0)


def test_ddpm_is_reproducible_and_ddim_is_ddpm_with_eta_zero(gaussian_toy):
    objective = _objective("trigonometric", "v_prediction")
    model = gaussian_toy.model_fn(objective)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first, _ = SAMPLERS["ddpm"](model, objective, noise, 8, generator=torch.Generator().manual_seed(2))
    second, _ = SAMPLERS["ddpm"](model, objective, noise, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    deterministic, _ = SAMPLERS["ddpm"](model, objective, noise, 8, eta=0.0)
    torch.testing.assert_close(deterministic, SAMPLERS["ddim"](model, objective, noise, 8)[0])


def test_heun_converges_at_second_order_and_euler_at_first(gaussian_toy):
    objective = _objective("rectified_flow", "velocity")
    noise = torch.ones(1, 2, dtype=torch.float64)
    exact = gaussian_toy.flow_map(objective, noise)

    def error(name, steps):
        samples, _ = SAMPLERS[name](gaussian_toy.model_fn(objective), objective, noise, steps)
        return (samples - exact).abs().max().item()

    assert error("euler", 40) / error("euler", 20) == pytest.approx(0.5, abs=0.05)
    assert error("heun", 40) / error("heun", 20) == pytest.approx(0.25, abs=0.05)


def test_euler_on_rectified_flow_is_the_seed_loop():
    objective = _objective("rectified_flow", "velocity")
    weight = torch.tensor([[0.9, 0.2], [-0.1, 1.1]])

    def model(x_t, t):
        return x_t @ weight + t[:, None]

    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    samples, _ = SAMPLERS["euler"](model, objective, noise, 10)
    x = noise.clone()
    for i in range(10, 0, -1):
        x = x - model(x, torch.full((5,), i / 10)) / 10
    torch.testing.assert_close(samples, x)


@pytest.mark.parametrize("sampler_name, expected_nfe", [("euler", 7), ("heun", 13), ("ddim", 7), ("ddpm", 7)])
def test_nfe_counts_model_calls(gaussian_toy, sampler_name, expected_nfe):
    objective = _objective("rectified_flow", "velocity")
    calls = []
    exact = gaussian_toy.model_fn(objective)

    def counted(x_t, t):
        calls.append(t[0].item())
        return exact(x_t, t)

    noise = torch.randn(3, 2, dtype=torch.float64)
    _, nfe = SAMPLERS[sampler_name](counted, objective, noise, 7)
    assert nfe == len(calls) == expected_nfe
    assert max(calls) == 1.0 and min(calls) > 0  # starts at pure noise, never evaluates t = 0

    def denoiser(x_t, t, labels):
        return exact(x_t, t)

    for w, per_call in ((0.0, 1), (2.0, 2)):
        guided = make_guided_model_fn(denoiser, torch.zeros(3), torch.ones(3), w)
        _, nfe = SAMPLERS[sampler_name](guided, objective, noise, 7)
        assert nfe == per_call * expected_nfe and guided.calls == expected_nfe


def test_time_grid_runs_from_noise_to_data_and_shifts():
    grid = time_grid(4)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted.diff() < 0).all()
    assert (shifted[1:-1] > grid[1:-1]).all()
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)


def test_shifted_grid_is_used_by_the_samplers(gaussian_toy):
    objective = _objective("rectified_flow", "velocity")
    seen = []
    exact = gaussian_toy.model_fn(objective)

    def recording(x_t, t):
        seen.append(t[0].item())
        return exact(x_t, t)

    SAMPLERS["euler"](recording, objective, torch.zeros(1, 2, dtype=torch.float64), 4, shift=3.0)
    torch.testing.assert_close(
        torch.tensor(seen, dtype=torch.float64), time_grid(4, shift=3.0, dtype=torch.float64)[:-1]
    )


def test_single_steps_accept_per_sample_times_and_keep_gradients():
    objective = _objective("rectified_flow", "velocity")
    x = torch.randn(3, 2, requires_grad=True)
    x_s = euler_step(lambda x_t, t: x_t * 2, objective, x, torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.4, 0.0]))
    x_s.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.8, 0.8, 0.6])[:, None].expand(3, 2))


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        get_sampler("dpm")
