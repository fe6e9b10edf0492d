"""Samplers: from noise at t = 1 to data at t = 0 with a model in any target parameterization: the probability-flow
ODE (euler, heun), DDIM and DDPM-ancestral updates, and Euler-Maruyama on the reverse-time SDE (sde).

Every sampler has the signature

    sampler(model_fn, objective, noise, num_steps, *, shift=1.0, generator=None) -> (x0, nfe)

model_fn(x_t (B, ...), t (B,)) -> prediction (B, ...) in objective.target; noise (B, ...) is the start
x_1; x0 (B, ...) are the samples. nfe is the number of network evaluations per sample, counted from the
calls actually made: each call counts model_fn.nfe_per_call (2 for a batched classifier-free-guidance
call, see guidance.py; 1 for a plain function). The time grid is uniform in t from 1 to 0, optionally
resolution-shifted. Samplers run under torch.no_grad(); the single-step functions do not, so that
distillation can use them as teacher steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gmpipe.diffusion.noise import standard_normal
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.score import diffusion_squared, drift_coefficient, reverse_sde_drift
from gmpipe.diffusion.time_density import resolution_shift
from gmpipe.diffusion.times import as_time, expand_like
from gmpipe.registry import SAMPLERS

ModelFn = Callable[[Tensor, Tensor], Tensor]
Sampler = Callable[..., tuple[Tensor, int]]

# Euler-Maruyama on the linear part dx = f x dt is stable for |f| (t - s) <= 2 (|1 + f (s - t)| <= 1); a longer
# step than that, where the reverse SDE would overshoot, takes the probability-flow step instead
EULER_MARUYAMA_STABILITY = 2.0


def time_grid(
    num_steps: int,
    *,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(num_steps + 1,) times from 1 to 0: uniform in t, then resolution_shift(t, shift)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return resolution_shift(torch.linspace(1, 0, num_steps + 1, device=device, dtype=dtype), shift)


def euler_step(model_fn: ModelFn, objective: Objective, x_t: Tensor, t: float | Tensor, s: float | Tensor) -> Tensor:
    """One Euler step of the probability-flow ODE dx/dt = v(x_t, t) from t to s: x_s = x_t + (s - t) v.

    For rectified flow with a velocity model and s = t - 1/T this is the seed's x <- x - v / T.
    t, s: floats or (B,). One model call.
    """
    t, s = as_time(t, x_t), as_time(s, x_t)
    velocity = objective.velocity(model_fn(x_t, t), x_t, t)
    return x_t + expand_like(s - t, x_t) * velocity


def heun_step(model_fn: ModelFn, objective: Objective, x_t: Tensor, t: float | Tensor, s: float | Tensor) -> Tensor:
    """One Heun (trapezoidal predictor-corrector) step from t to s, Karras et al. 2022, Algorithm 1:
    x' = x_t + (s - t) v(x_t, t), x_s = x_t + (s - t) (v(x_t, t) + v(x', s)) / 2.

    Two model calls; s must be > 0 (VP velocities are singular at t = 0), use euler_step to reach 0.
    """
    t, s = as_time(t, x_t), as_time(s, x_t)
    step = expand_like(s - t, x_t)
    velocity_t = objective.velocity(model_fn(x_t, t), x_t, t)
    x_euler = x_t + step * velocity_t
    velocity_s = objective.velocity(model_fn(x_euler, s), x_euler, s)
    return x_t + step * (velocity_t + velocity_s) / 2


def ancestral_sigma(objective: Objective, t: Tensor, s: Tensor, eta: float) -> Tensor:
    """sigma_{t->s} = eta * b(s) * sqrt(1 - r^2), r = a(t) b(s) / (a(s) b(t)): Song et al. 2021 (DDIM),
    eq. 16, for a general path. With eta = 1 this is the std of the DDPM posterior q(x_s | x_t, x) of
    the Markov chain with these marginals; eta = 0 is deterministic DDIM. t, s: (B,), 0 <= s < t."""
    schedule = objective.schedule
    a_t, b_t, a_s, b_s = schedule.a(t), schedule.b(t), schedule.a(s), schedule.b(s)
    r = a_t * b_s / (a_s * b_t)
    return eta * b_s * (1 - r.square()).clamp_min(0).sqrt()


def ddim_step(
    model_fn: ModelFn,
    objective: Objective,
    x_t: Tensor,
    t: float | Tensor,
    s: float | Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generalized DDIM update, Song et al. 2021, eq. 12 in (a, b) form:
    x_s = a(s) x_hat + sqrt(b(s)^2 - sigma^2) z_hat + sigma eps, sigma = ancestral_sigma(t, s, eta).

    eta = 0 is deterministic DDIM, eta = 1 is DDPM ancestral sampling. One model call. t, s: floats or
    (B,) with 0 <= s < t <= 1.
    """
    t, s = as_time(t, x_t), as_time(s, x_t)
    x_hat, z_hat = objective.to_data_and_noise(model_fn(x_t, t), x_t, t)
    a_s, b_s = objective.schedule.a(s), objective.schedule.b(s)
    x_s = expand_like(a_s, x_t) * x_hat
    if eta == 0:
        return x_s + expand_like(b_s, x_t) * z_hat
    sigma = ancestral_sigma(objective, t, s, eta)
    noise_scale = (b_s.square() - sigma.square()).clamp_min(0).sqrt()
    fresh_noise = standard_normal(tuple(x_t.shape), generator=generator, device=x_t.device, dtype=x_t.dtype)
    return x_s + expand_like(noise_scale, x_t) * z_hat + expand_like(sigma, x_t) * fresh_noise


def reverse_sde_step(
    model_fn: ModelFn,
    objective: Objective,
    x_t: Tensor,
    t: float | Tensor,
    s: float | Tensor,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One Euler-Maruyama step of the reverse-time SDE (Song et al. 2021, eq. 6; the eta family in score.py)
    from t to s < t:

        x_s = x_t + (s - t) [f x_t - (1 + eta^2)/2 g^2 grad log p_t(x_t)] + eta g(t) sqrt(t - s) eps.

    Two kinds of step take the eta = 0 (probability-flow ODE) step instead, per sample: the last step into
    s = 0, so that it adds no noise; and a step longer than EULER_MARUYAMA_STABILITY / |f(t)|, which includes
    leaving a time where a(t) = 0 (rectified flow and trigonometric at t = 1: f and g^2 are infinite there, the
    forward process forgets x at once) and the first step of a coarse grid on vp_cosine (a(1) = 0.01). One
    model call; t, s: floats or (B,) with 0 <= s < t <= 1.
    """
    t, s = as_time(t, x_t), as_time(s, x_t)
    stable = drift_coefficient(objective.schedule, t).abs() * (t - s) <= EULER_MARUYAMA_STABILITY
    eta_per_sample = torch.where(stable & (s > 0), torch.full_like(t, eta), torch.zeros_like(t))
    drift = reverse_sde_drift(objective, model_fn(x_t, t), x_t, t, eta_per_sample)
    x_s = x_t + expand_like(s - t, x_t) * drift
    if not eta_per_sample.any():
        return x_s
    g = diffusion_squared(objective.schedule, t).clamp_min(0).sqrt()
    noise_scale = torch.where(eta_per_sample > 0, eta_per_sample * g * (t - s).sqrt(), torch.zeros_like(t))
    fresh_noise = standard_normal(tuple(x_t.shape), generator=generator, device=x_t.device, dtype=x_t.dtype)
    return x_s + expand_like(noise_scale, x_t) * fresh_noise


class CallCounter:
    """Wraps model_fn and counts network evaluations per sample (calls x model_fn.nfe_per_call)."""

    def __init__(self, model_fn: ModelFn) -> None:
        self.model_fn = model_fn
        self.nfe = 0

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.nfe += getattr(self.model_fn, "nfe_per_call", 1)
        return self.model_fn(x_t, t)


def _integrate(model_fn: ModelFn, noise: Tensor, num_steps: int, shift: float, step) -> tuple[Tensor, int]:
    """Walk time_grid(num_steps, shift) from t = 1 to 0 with step(model, x, t, s) -> x_s; count the NFE."""
    model = CallCounter(model_fn)
    times = time_grid(num_steps, shift=shift, device=noise.device, dtype=noise.dtype)
    x = noise
    for t, s in zip(times[:-1], times[1:], strict=True):
        x = step(model, x, t, s)
    return x, model.nfe


@torch.no_grad()
def euler(
    model_fn: ModelFn,
    objective: Objective,
    noise: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Euler on the probability-flow ODE from t = 1 to 0. NFE = num_steps (x nfe_per_call)."""
    return _integrate(model_fn, noise, num_steps, shift, lambda m, x, t, s: euler_step(m, objective, x, t, s))


@torch.no_grad()
def heun(
    model_fn: ModelFn,
    objective: Objective,
    noise: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1) from t = 1 to 0, with a plain Euler
    last step into t = 0. NFE = 2 num_steps - 1 (x nfe_per_call)."""

    def step(model, x, t, s):
        return heun_step(model, objective, x, t, s) if s > 0 else euler_step(model, objective, x, t, s)

    return _integrate(model_fn, noise, num_steps, shift, step)


@torch.no_grad()
def ddim(
    model_fn: ModelFn,
    objective: Objective,
    noise: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Deterministic DDIM (eta = 0) from t = 1 to 0. NFE = num_steps (x nfe_per_call)."""
    return _integrate(model_fn, noise, num_steps, shift, lambda m, x, t, s: ddim_step(m, objective, x, t, s))


@torch.no_grad()
def ddpm(
    model_fn: ModelFn,
    objective: Objective,
    noise: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
) -> tuple[Tensor, int]:
    """Stochastic ancestral sampling: ddim_step with eta (1 = DDPM posterior noise) from t = 1 to 0.

    Fresh noise comes from `generator`; the last step into t = 0 adds none (sigma = 0 there because
    b(0) = 0). NFE = num_steps (x nfe_per_call).
    """

    def step(model, x, t, s):
        return ddim_step(model, objective, x, t, s, eta=eta, generator=generator)

    return _integrate(model_fn, noise, num_steps, shift, step)


@torch.no_grad()
def sde(
    model_fn: ModelFn,
    objective: Objective,
    noise: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
) -> tuple[Tensor, int]:
    """Euler-Maruyama on the reverse-time SDE from t = 1 to 0 (reverse_sde_step), for any schedule (a, b).

    eta = 1 is the reverse SDE of Song et al. 2021 (eq. 6), eta = 0 the probability-flow ODE (then this is
    `euler`), values in between or above keep the marginals and change how much fresh noise replaces the
    model's drift. Fresh noise comes from `generator`. NFE = num_steps (x nfe_per_call).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def step(model, x, t, s):
        return reverse_sde_step(model, objective, x, t, s, eta=eta, generator=generator)

    return _integrate(model_fn, noise, num_steps, shift, step)


def get_sampler(name: str) -> Sampler:
    """The sampler registered as `name` in ``gmpipe.registry.SAMPLERS`` (these four, and the multistep
    consistency sampler of ``gmpipe.diffusion.consistency``)."""
    return SAMPLERS.lookup(name)
