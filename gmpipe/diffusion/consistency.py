"""The consistency function of Song et al. 2023 ("Consistency Models") in the latent-consistency form of Luo et al.
2023 (LCM), and its multistep sampler (Song et al. 2023, Algorithm 1).

A consistency model f(x_t, t) maps every point of a probability-flow ODE trajectory to its end at t = 0. Here f is
built from a plain model in the objective's parameterization: its data estimate x_hat (the 2x2 conversion of
`Objective`) is mixed with x_t by the skip/out scalings that enforce the boundary condition f(x, 0) = x
(`boundary_scalings`, `consistency_function`). How such a model is trained is ``gmpipe.distill.consistency``.

Sampling: `consistency_sample`, registered as the "consistency" sampler. One step is f(noise, 1); more steps
re-noise the estimate with fresh noise at the next grid time and apply f again. Use a sampling grid whose times are
on the training grid (the distillation's num_intervals a multiple of the step count, same shift). With the default
scalings c_skip(t) is about 2.5e-9 / t^2, so a 1-step consistency sample f(noise, 1) is the 1-step DDIM sample to
float32 precision; multistep sampling is not DDIM (it re-noises with fresh noise).

Shapes: x, x_t, predictions (B, ...); times (B,). Time convention: t = 0 data, t = 1 noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gmpipe.diffusion.noise import standard_normal
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.samplers import time_grid
from gmpipe.diffusion.times import as_time, expand_like

ModelFn = Callable[[Tensor, Tensor], Tensor]  # model_fn(x_t (B, ...), t (B,)) -> prediction (B, ...)

SIGMA_DATA = 0.5  # LCM's sigma_data
TIME_SCALE = 10_000.0  # LCM scales its integer timesteps (0..999) by 10: t in [0, 1] times 1000 times 10


def boundary_scalings(
    t: Tensor, sigma_data: float = SIGMA_DATA, time_scale: float = TIME_SCALE
) -> tuple[Tensor, Tensor]:
    """(c_skip(t), c_out(t)), each (B,): c_skip = sigma_data^2 / (tau^2 + sigma_data^2),
    c_out = tau / sqrt(tau^2 + sigma_data^2), tau = time_scale * t (the form of Song et al. 2023 with
    LCM's time scaling). c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x exactly."""
    tau = time_scale * t
    denominator = tau.square() + sigma_data**2
    return sigma_data**2 / denominator, tau / denominator.sqrt()


def consistency_function(
    model_fn: ModelFn,
    objective: Objective,
    x_t: Tensor,
    t: Tensor,
    *,
    sigma_data: float = SIGMA_DATA,
    time_scale: float = TIME_SCALE,
) -> Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x_hat(x_t, t), with x_hat the data estimate of model_fn's
    prediction (Song et al. 2023, sec. 3, with the network's output read as a data estimate, as in LCM).
    x_t: (B, ...); t: (B,). Returns (B, ...)."""
    t = as_time(t, x_t)
    x_hat, _ = objective.to_data_and_noise(model_fn(x_t, t), x_t, t)
    c_skip, c_out = boundary_scalings(t, sigma_data, time_scale)
    return expand_like(c_skip, x_t) * x_t + expand_like(c_out, x_t) * x_hat


@torch.no_grad()
def consistency_sample(
    model_fn: ModelFn,
    objective: Objective,
    noise: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    sigma_data: float = SIGMA_DATA,
    time_scale: float = TIME_SCALE,
) -> tuple[Tensor, int]:
    """Multistep consistency sampling, Song et al. 2023, Algorithm 1: x = f(noise, 1); then for each later
    time tau > 0 of `time_grid(num_steps, shift)`: x = f(a(tau) x + b(tau) eps, tau), eps fresh from
    `generator`. Same signature and (samples, NFE) result as the gmpipe.diffusion samplers."""
    times = time_grid(num_steps, shift=shift, device=noise.device, dtype=noise.dtype)
    scalings = {"sigma_data": sigma_data, "time_scale": time_scale}
    x = consistency_function(model_fn, objective, noise, as_time(times[0], noise), **scalings)
    for tau in times[1:-1]:
        eps = standard_normal(tuple(noise.shape), generator=generator, device=noise.device, dtype=noise.dtype)
        x_tau = objective.interpolate(x, eps, tau)
        x = consistency_function(model_fn, objective, x_tau, as_time(tau, noise), **scalings)
    return x, num_steps * getattr(model_fn, "nfe_per_call", 1)
