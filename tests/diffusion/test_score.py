"""The score -z_hat / b against the exact score of a Gaussian toy for every (schedule, target), the forward SDE of
each path, and the reverse-SDE (Euler-Maruyama) sampler landing on the toy's mean and variance."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import SAMPLERS, SCHEDULES, Objective, get_sampler, get_schedule, get_target, make_guided_model_fn
from gmpipe.diffusion.score import diffusion_squared, drift_coefficient, reverse_sde_drift, score
from gmpipe.diffusion.times import expand_like

TIMES = [0.02, 0.25, 0.5, 0.75, 0.98]  # interior: the 2x2 system of every pair is regular here

# one target per schedule, regular on (0, 1] (epsilon is singular at t = 1 where a(1) = 0)
SDE_PAIRS = [
    ("rectified_flow", "velocity"),
    ("vp_linear", "epsilon"),
    ("vp_cosine", "v_prediction"),
    ("trigonometric", "v_prediction"),
]


def _objective(schedule: str, target: str) -> Objective:
    return Objective(get_schedule(schedule), get_target(target))


def _exact_score(toy, objective: Objective, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t ~ N(a mu, (a^2 s^2 + b^2) I) per dimension, so grad log p_t = -(x_t - a mu) / (a^2 s^2 + b^2)."""
    a = expand_like(objective.schedule.a(t), x_t)
    b = expand_like(objective.schedule.b(t), x_t)
    return -(x_t - a * toy.mu) / (a.square() * toy.std.square() + b.square())


def test_score_matches_the_exact_gaussian_score(objective, gaussian_toy):
    # the exact prediction in this target, converted to a score through the 2x2 solve, is the closed form
    t = torch.tensor(TIMES, dtype=torch.float64)
    x_t = torch.randn(len(TIMES), 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    prediction = gaussian_toy.model_fn(objective)(x_t, t)
    torch.testing.assert_close(
        score(objective, prediction, x_t, t), _exact_score(gaussian_toy, objective, x_t, t), rtol=1e-9, atol=1e-9
    )


def test_score_of_a_wrong_prediction_is_wrong(gaussian_toy):
    # guards against a score that ignores the prediction: a shifted prediction moves the score
    objective = _objective("rectified_flow", "velocity")
    t = torch.tensor(TIMES, dtype=torch.float64)
    x_t = torch.zeros(len(TIMES), 2, dtype=torch.float64)
    prediction = gaussian_toy.model_fn(objective)(x_t, t)
    exact = _exact_score(gaussian_toy, objective, x_t, t)
    assert (score(objective, prediction + 0.1, x_t, t) - exact).abs().min() > 1e-3


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_forward_sde_has_the_path_as_its_moments(name):
    # m' = f m with m = a, and v' = 2 f v + g^2 with v = b^2 (derivative of b^2 by central differences)
    schedule = get_schedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    step = 1e-6
    dv_dt = (schedule.b(t + step).square() - schedule.b(t - step).square()) / (2 * step)
    f, g2 = drift_coefficient(schedule, t), diffusion_squared(schedule, t)
    torch.testing.assert_close(f * schedule.a(t), schedule.da(t))
    torch.testing.assert_close(2 * f * schedule.b(t).square() + g2, dv_dt, rtol=1e-6, atol=1e-6)
    assert (g2 > 0).all()


def test_sde_coefficients_in_closed_form():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    vp = get_schedule("vp_linear")
    torch.testing.assert_close(diffusion_squared(vp, t), vp.beta(t))  # the VP SDE of Song et al. 2021
    torch.testing.assert_close(drift_coefficient(vp, t), -vp.beta(t) / 2)
    flow = get_schedule("rectified_flow")
    torch.testing.assert_close(diffusion_squared(flow, t), 2 * t / (1 - t))
    torch.testing.assert_close(drift_coefficient(flow, t), -1 / (1 - t))


def test_reverse_drift_is_song_eq_6_and_the_ode_velocity_at_eta_zero(objective, gaussian_toy):
    t = torch.tensor(TIMES, dtype=torch.float64)
    x_t = torch.randn(len(TIMES), 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prediction = gaussian_toy.model_fn(objective)(x_t, t)
    f = expand_like(drift_coefficient(objective.schedule, t), x_t)
    g2 = expand_like(diffusion_squared(objective.schedule, t), x_t)
    grad_log_p = score(objective, prediction, x_t, t)
    for eta in (0.0, 0.5, 1.0):
        textbook = f * x_t - (1 + eta**2) / 2 * g2 * grad_log_p
        torch.testing.assert_close(reverse_sde_drift(objective, prediction, x_t, t, eta), textbook)
    assert torch.equal(reverse_sde_drift(objective, prediction, x_t, t, 0.0), objective.velocity(prediction, x_t, t))


@pytest.mark.parametrize("schedule, target", SDE_PAIRS)
def test_sde_sampler_lands_on_the_gaussian(gaussian_toy, schedule, target):
    objective = _objective(schedule, target)
    generator = torch.Generator().manual_seed(0)
    n, steps = 10_000, 100
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    samples, nfe = get_sampler("sde")(gaussian_toy.model_fn(objective), objective, noise, steps, generator=generator)
    assert nfe == steps and torch.isfinite(samples).all()
    # standard errors with n = 10,000: 1.0% of std for the mean, 0.7% for the std. Euler-Maruyama is first
    # order: at 100 steps the bias measured with n = 20,000 is <= 1.6% of std for every schedule here (4.6% at
    # 25 steps). Tolerance = that bias + about 4 standard errors.
    std = gaussian_toy.std
    torch.testing.assert_close((samples.mean(0) - gaussian_toy.mu) / std, torch.zeros(2, dtype=torch.float64),
                               atol=0.055, rtol=0)
    torch.testing.assert_close(samples.std(0) / std, torch.ones(2, dtype=torch.float64), atol=0.045, rtol=0)


@pytest.mark.parametrize("schedule, target", [("rectified_flow", "velocity"), ("vp_linear", "epsilon")])
def test_sde_forgets_a_wrong_start_where_the_ode_cannot(gaussian_toy, schedule, target):
    # noise twice too wide: the ODE maps it affinely to samples twice too wide, the reverse SDE contracts the
    # start away (infinitely fast near t = 1 where a = 0; by a factor of about a(1) for vp_linear)
    objective = _objective(schedule, target)
    generator = torch.Generator().manual_seed(3)
    noise = 2 * torch.randn(10_000, 2, generator=generator, dtype=torch.float64)
    model = gaussian_toy.model_fn(objective)
    ode_samples, _ = SAMPLERS["euler"](model, objective, noise, 100)
    sde_samples, _ = SAMPLERS["sde"](model, objective, noise, 100, generator=generator)
    assert (ode_samples.std(0) / gaussian_toy.std > 1.8).all()
    torch.testing.assert_close(sde_samples.std(0) / gaussian_toy.std, torch.ones(2, dtype=torch.float64),
                               atol=0.045, rtol=0)


def test_sde_with_eta_zero_is_euler_and_is_reproducible(gaussian_toy):
    objective = _objective("trigonometric", "v_prediction")
    model = gaussian_toy.model_fn(objective)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first, _ = SAMPLERS["sde"](model, objective, noise, 8, generator=torch.Generator().manual_seed(2))
    second, _ = SAMPLERS["sde"](model, objective, noise, 8, generator=torch.Generator().manual_seed(2))
    other, _ = SAMPLERS["sde"](model, objective, noise, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and not torch.allclose(first, other)
    deterministic, _ = SAMPLERS["sde"](model, objective, noise, 8, eta=0.0)
    assert torch.equal(deterministic, SAMPLERS["euler"](model, objective, noise, 8)[0])
    with pytest.raises(ValueError, match="eta"):
        SAMPLERS["sde"](model, objective, noise, 8, eta=-1.0)


def test_sde_endpoints_take_the_ode_step(gaussian_toy):
    # on rectified flow the step leaving t = 1 (a = 0, f and g infinite) and the step into t = 0 are ODE steps:
    # with 1 or 2 steps there is no noise at all (the result is Euler's), with 3 the middle step is stochastic
    objective = _objective("rectified_flow", "velocity")
    model = gaussian_toy.model_fn(objective)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def sde(steps, seed):
        return SAMPLERS["sde"](model, objective, noise, steps, generator=torch.Generator().manual_seed(seed))[0]

    for steps in (1, 2):
        assert torch.equal(sde(steps, 5), SAMPLERS["euler"](model, objective, noise, steps)[0])
        assert torch.equal(sde(steps, 5), sde(steps, 6))
    assert not torch.allclose(sde(3, 5), sde(3, 6))


def test_sde_counts_network_evaluations(gaussian_toy):
    objective = _objective("vp_linear", "epsilon")
    exact = gaussian_toy.model_fn(objective)
    calls = []

    def counted(x_t, t):
        calls.append(t[0].item())
        return exact(x_t, t)

    noise = torch.randn(3, 2, dtype=torch.float64)
    _, nfe = get_sampler("sde")(counted, objective, noise, 7, generator=torch.Generator().manual_seed(0))
    assert nfe == len(calls) == 7
    assert max(calls) == 1.0 and min(calls) > 0  # starts at pure noise, never evaluates t = 0

    def denoiser(x_t, t, labels):
        return exact(x_t, t)

    for w, per_call in ((0.0, 1), (2.0, 2)):
        guided = make_guided_model_fn(denoiser, torch.zeros(3), torch.ones(3), w)
        _, nfe = SAMPLERS["sde"](guided, objective, noise, 7, generator=torch.Generator().manual_seed(0))
        assert nfe == per_call * 7 and guided.calls == 7
