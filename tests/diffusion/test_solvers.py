"""diffusers' training-free solvers as gmpipe samplers, on the Gaussian toy with the exact model: the mapping onto
gmpipe's schedule and target is exact (first-order DPM-Solver++ is gmpipe's DDIM, flow-matching Euler on rectified
flow is gmpipe's Euler), each lands on the data's mean and spread with few steps and converges to the ODE's answer,
NFE is counted per model call, guidance and the shifted grid go through."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from gmpipe.diffusion import SAMPLERS, Objective, get_schedule, get_target, make_guided_model_fn
from gmpipe.diffusion.samplers import time_grid
from gmpipe.diffusion.solvers import flow_sigmas, solve

SOLVERS = ("dpmpp_2m", "unipc", "flow_euler")
SECOND_ORDER = ("dpmpp_2m", "unipc")
PAIRS = [
    ("rectified_flow", "velocity"),
    ("rectified_flow", "data"),
    ("vp_linear", "epsilon"),
    ("vp_cosine", "v_prediction"),
    ("trigonometric", "v_prediction"),
]
# x_1 = 0 and the unit vectors: with the exact (affine) model a deterministic sampler is an affine map of the noise,
# so these read off the sample mean (the image of 0) and the sample std per dimension (the slopes)
PROBES = torch.cat([torch.zeros(1, 2), torch.eye(2)]).to(torch.float64)


def _objective(schedule: str, target: str) -> Objective:
    return Objective(get_schedule(schedule), get_target(target))


def _mean_and_std(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return samples[0], torch.diagonal(samples[1:] - samples[0])


def _std_error(toy, objective: Objective, name: str, steps: int) -> float:
    """Largest relative error of the sample std against the exact probability-flow map's."""
    samples, _ = SAMPLERS[name](toy.model_fn(objective), objective, PROBES, steps)
    _, std = _mean_and_std(samples)
    _, exact_std = _mean_and_std(toy.flow_map(objective, PROBES))
    return ((std - exact_std) / exact_std).abs().max().item()


@pytest.mark.parametrize("schedule, target", PAIRS)
def test_solvers_land_on_the_gaussian_in_few_steps(gaussian_toy, schedule, target):
    """Mean within 1% of the data std at 8 steps; std within 10% at 16 steps (20% for first-order flow Euler); at
    8 steps the second-order solvers beat flow Euler at the same NFE."""
    objective = _objective(schedule, target)
    exact_mean, _ = _mean_and_std(gaussian_toy.flow_map(objective, PROBES))
    errors = {}
    for name in SOLVERS:
        samples, nfe = SAMPLERS[name](gaussian_toy.model_fn(objective), objective, PROBES, 8)
        assert nfe == 8
        mean, _ = _mean_and_std(samples)
        torch.testing.assert_close(mean, exact_mean, atol=0.01 * gaussian_toy.std.max().item(), rtol=0)
        errors[name] = _std_error(gaussian_toy, objective, name, 8)
        assert _std_error(gaussian_toy, objective, name, 16) < (0.1 if name in SECOND_ORDER else 0.2)
    assert max(errors[name] for name in SECOND_ORDER) < errors["flow_euler"]
    table = {name: [_std_error(gaussian_toy, objective, name, n) for n in (4, 8, 16)] for name in (*SOLVERS, "euler",
                                                                                                   "heun")}
    print(f"\n{schedule}/{target}: relative std error at 4/8/16 steps: " + ", ".join(
        f"{name} {'/'.join(f'{e:.3f}' for e in values)}" for name, values in table.items()))


@pytest.mark.parametrize("schedule, target", [("rectified_flow", "velocity"), ("vp_cosine", "v_prediction")])
def test_solvers_converge_to_the_ode_solution(gaussian_toy, schedule, target):
    """Quadrupling the steps cuts the error at least 3x (first order: 4x), down to < 2% at 128 steps for the
    second-order solvers."""
    objective = _objective(schedule, target)
    for name in SOLVERS:
        coarse, fine = (_std_error(gaussian_toy, objective, name, steps) for steps in (16, 64))
        assert fine < coarse / 3, (name, coarse, fine)
    for name in SECOND_ORDER:
        assert _std_error(gaussian_toy, objective, name, 128) < 0.02


@pytest.mark.parametrize("schedule, target", PAIRS)
def test_the_mapping_is_exact_first_order_dpm_solver_is_ddim(gaussian_toy, schedule, target):
    """DPM-Solver++ at first order is DDIM (Lu et al. 2022): the same grid, 2x2 conversion and flow sigmas must give
    gmpipe's own DDIM, up to diffusers' float32 arithmetic; flow Euler on rectified flow is gmpipe's Euler."""
    objective = _objective(schedule, target)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=1, prediction_type="sample",
                                            use_flow_sigmas=True, final_sigmas_type="zero")
    scheduler.set_timesteps(7)
    sigmas, _ = flow_sigmas(objective, time_grid(7, dtype=torch.float64))
    scheduler.sigmas, scheduler.timesteps = sigmas.float(), sigmas[:-1].float() * 1000
    first_order, nfe = solve(gaussian_toy.model_fn(objective), objective, noise, 7, 1.0, scheduler,
                             lambda x_hat, z_hat: x_hat)
    ddim, _ = SAMPLERS["ddim"](gaussian_toy.model_fn(objective), objective, noise, 7)
    assert nfe == 7
    torch.testing.assert_close(first_order, ddim, rtol=0, atol=1e-5)
    if schedule == "rectified_flow":
        euler, _ = SAMPLERS["euler"](gaussian_toy.model_fn(objective), objective, noise, 7)
        torch.testing.assert_close(SAMPLERS["flow_euler"](gaussian_toy.model_fn(objective), objective, noise, 7)[0],
                                   euler, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SOLVERS)
def test_solvers_count_nfe_evaluate_the_shifted_grid_and_take_guidance(gaussian_toy, name):
    objective = _objective("vp_cosine", "v_prediction")
    exact = gaussian_toy.model_fn(objective)
    seen = []

    def recording(x_t, t):
        seen.append(t[0].item())
        return exact(x_t, t)

    noise = torch.randn(3, 2, dtype=torch.float64)
    samples, nfe = SAMPLERS[name](recording, objective, noise, 5, shift=3.0)
    assert nfe == len(seen) == 5 and samples.dtype == noise.dtype and torch.isfinite(samples).all()
    grid = time_grid(5, shift=3.0, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), grid[:-1])

    def denoiser(x_t, t, labels):
        return exact(x_t, t) + labels[:, None].to(x_t)  # the null label (1) moves the prediction

    unguided, _ = SAMPLERS[name](make_guided_model_fn(denoiser, torch.zeros(3), torch.ones(3), 0.0), objective,
                                 noise, 5)
    guided_fn = make_guided_model_fn(denoiser, torch.zeros(3), torch.ones(3), 2.0)
    guided, nfe = SAMPLERS[name](guided_fn, objective, noise, 5)
    assert nfe == 10 and guided_fn.calls == 5
    assert not torch.allclose(guided, unguided, atol=1e-3)
