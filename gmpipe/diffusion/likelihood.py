"""Likelihood of data under a diffusion model's probability-flow ODE (Song et al. 2021, sec. 4.3 and appendix D.2;
Chen et al. 2018; Grathwohl et al. 2019, FFJORD).

The ODE dx_t/dt = v(x_t, t) (objective.velocity) is a continuous normalizing flow: along a trajectory the density
obeys d log p_t(x_t)/dt = -div v(x_t, t) (the instantaneous change of variables, Chen et al. 2018, theorem 1), so
running the ODE forward from the data x = x_0 to x_1 gives

    log p_0(x) = log p_1(x_1) + integral_0^1 div v(x_t, t) dt,

with p_1 the noise at t = 1, N(0, b(1)^2 I) (exact where a(1) = 0; the VP schedules keep a(1) <= 0.01, whose
share a(1) x of x_1 the prior ignores). The divergence is the trace of the Jacobian dv/dx: computed exactly with
one vector-Jacobian product per dimension (small data only), or estimated by Hutchinson's estimator
tr(J) = E[eps^T J eps] with Rademacher or Gaussian probes eps, one VJP per probe, each probe fixed along the
trajectory (FFJORD), so the integrand stays smooth for the fixed-step integrator. Each probe gives its own
integral; their spread is the estimator's standard error.

What this measures: the density of the model's ODE (a flow defined by the network), not of the data, and not of
the SDE samplers (their marginals match the ODE's only for an exact score). Integration starts at t_min > 0
(the VP velocity is singular at t = 0), so it is log p_{t_min} evaluated at x, a small bias.

Requirement on model_fn: samples in a batch are independent (no batch statistics), so that one VJP of the batch
sum gives every sample's own Jacobian-vector product. Shapes: x (B, ...), D = x[0].numel() dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gmpipe.diffusion.noise import standard_normal, standard_uniform
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.times import as_time
from gmpipe.seeds import SampleNoise

ModelFn = Callable[[Tensor, Tensor], Tensor]
Trace = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]
Integrator = Literal["rk4", "heun"]

INTEGRATOR_STAGES = {"heun": 2, "rk4": 4}  # model calls per step


@dataclass(frozen=True)
class ODELikelihood:
    """The result of `ode_log_likelihood`, per sample.

    log_likelihood: (B,) nats, log p_0(x) under the probability-flow ODE.
    standard_error: (B,) nats, the Hutchinson estimator's standard error across probes (0 for the exact trace,
        NaN with a single probe).
    num_dims: D, the dimensions per sample.
    nfe: network evaluations per sample (forward calls x nfe_per_call; each also costs one backward pass per
        probe, or per dimension for the exact trace).
    """

    log_likelihood: Tensor
    standard_error: Tensor
    num_dims: int
    nfe: int

    def bits_per_dim(self) -> Tensor:
        """(B,) -log p_0(x) / (D ln 2)."""
        return bits_per_dim(self.log_likelihood, self.num_dims)


def bits_per_dim(log_likelihood: Tensor, num_dims: int) -> Tensor:
    """Negative log-likelihood in bits per dimension: -log p(x) / (D ln 2), from log p(x) in nats."""
    return -log_likelihood / (num_dims * math.log(2))


def normalization_log_det(scale: Sequence[float], latent_shape: Sequence[int]) -> float:
    """log |det d normalized / d latent| for normalized = (latent - shift) * scale with one scale per channel
    (data/latents.py): sum over the C x H x W dimensions of log scale_c = H W sum_c log scale_c.

    By the change of variables log p_latent(latent) = log p_normalized(normalized) + this, so adding it to
    `ODELikelihood.log_likelihood` of normalized latents gives the log-density of the latents as the autoencoder
    writes them (report bits per dimension in either space, saying which). latent_shape: (C, H, W) or (C, ...).
    """
    if len(scale) != latent_shape[0]:
        raise ValueError(f"{len(scale)} scales for {latent_shape[0]} latent channels")
    if any(value <= 0 for value in scale):
        raise ValueError(f"scales must be positive, got {list(scale)}")
    per_channel = math.prod(latent_shape[1:])
    return per_channel * sum(math.log(value) for value in scale)


def prior_log_prob(objective: Objective, x_1: Tensor) -> Tensor:
    """log N(x_1; 0, b(1)^2 I), the noise end of the path, summed over dimensions. x_1: (B, ...). Returns (B,)."""
    b_1 = objective.schedule.b(torch.ones((), dtype=x_1.dtype, device=x_1.device))
    num_dims = x_1[0].numel()
    squared_norm = x_1.flatten(1).square().sum(1)
    return -0.5 * squared_norm / b_1.square() - num_dims * (torch.log(b_1) + 0.5 * math.log(2 * math.pi))


def draw_probes(
    num_probes: int, like: Tensor, probe: Probe = "rademacher", generator: torch.Generator | SampleNoise | None = None
) -> Tensor:
    """(K, B, ...) Hutchinson probes with E[eps eps^T] = I: Rademacher (+-1, the lower-variance choice) or
    standard normal. With a ``SampleNoise`` generator, sample i's K probes come from its own stream (so its
    estimate does not depend on the batch it is in)."""
    per_sample = isinstance(generator, SampleNoise)
    shape = (like.shape[0], num_probes, *like.shape[1:]) if per_sample else (num_probes, *like.shape)
    if probe == "rademacher":
        uniform = standard_uniform(shape, generator=generator, device=like.device, dtype=like.dtype)
        probes = torch.where(uniform < 0.5, -torch.ones_like(uniform), torch.ones_like(uniform))
    elif probe == "gaussian":
        probes = standard_normal(shape, generator=generator, device=like.device, dtype=like.dtype)
    else:
        raise ValueError(f"unknown probe {probe!r}; choose 'rademacher' or 'gaussian'")
    return probes.transpose(0, 1) if per_sample else probes


def velocity_and_divergence(
    model_fn: ModelFn, objective: Objective, x_t: Tensor, t: Tensor, probes: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The ODE velocity v(x_t, t) (B, ...) and its divergence div v = tr(dv/dx_t), (K, B).

    probes (K, B, ...): Hutchinson estimates eps_k^T (dv/dx) eps_k, one row per probe. probes None: the exact
    trace, one VJP per dimension, returned as one row (K = 1). One model call either way.
    """
    with torch.enable_grad():
        x_t = x_t.detach().requires_grad_(True)
        velocity = objective.velocity(model_fn(x_t, t), x_t, t)
        if probes is not None:
            rows = []
            for k, probe in enumerate(probes):
                (vjp,) = torch.autograd.grad(velocity, x_t, probe, retain_graph=k < len(probes) - 1)
                rows.append((vjp * probe).flatten(1).sum(1))
            return velocity.detach(), torch.stack(rows)
        num_dims = x_t[0].numel()
        trace = torch.zeros(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
        basis = torch.zeros_like(x_t).flatten(1)
        for i in range(num_dims):
            basis.zero_()
            basis[:, i] = 1
            (vjp,) = torch.autograd.grad(velocity, x_t, basis.view_as(x_t), retain_graph=i < num_dims - 1)
            trace += vjp.flatten(1)[:, i]  # (e_i^T J)_i = J_ii
    return velocity.detach(), trace[None]


def ode_log_likelihood(
    model_fn: ModelFn,
    objective: Objective,
    x: Tensor,
    *,
    num_steps: int = 32,
    t_min: float = 1e-5,
    trace: Trace = "hutchinson",
    num_probes: int = 4,
    probe: Probe = "rademacher",
    integrator: Integrator = "rk4",
    generator: torch.Generator | SampleNoise | None = None,
) -> ODELikelihood:
    """log p_0(x) = log p_1(x_1) + integral_{t_min}^1 div v(x_t, t) dt along the probability-flow ODE from the
    data x to noise (module docstring; Song et al. 2021, appendix D.2), integrated with `num_steps` fixed steps
    of RK4 (4 model calls each) or Heun (2), uniform in t from t_min to 1.

    model_fn(x_t (B, ...), t (B,)) -> prediction in objective.target (for a conditional model, a closure over
    the conditions gives log p(x | y)). x: (B, ...) data in the space the model was trained on (normalized
    latents: see `normalization_log_det`). trace: "exact" (D VJPs per call, small D) or "hutchinson" with
    num_probes probes of kind `probe` drawn once from `generator` (a torch.Generator, or a SampleNoise for
    per-sample probes). Returns an ODELikelihood.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= t_min < 1:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    if integrator not in INTEGRATOR_STAGES:
        raise ValueError(f"unknown integrator {integrator!r}; choose one of {sorted(INTEGRATOR_STAGES)}")
    if trace == "hutchinson":
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        probes = draw_probes(num_probes, x, probe, generator)
    elif trace == "exact":
        probes = None
    else:
        raise ValueError(f"unknown trace {trace!r}; choose 'exact' or 'hutchinson'")

    def dynamics(x_t: Tensor, t: float) -> tuple[Tensor, Tensor]:
        return velocity_and_divergence(model_fn, objective, x_t, as_time(t, x_t), probes)

    times = torch.linspace(t_min, 1, num_steps + 1, dtype=torch.float64).tolist()
    x_t = x.detach()
    divergence_integral = torch.zeros(1 if probes is None else num_probes, x.shape[0], dtype=x.dtype, device=x.device)
    for t, s in zip(times[:-1], times[1:], strict=True):
        h = s - t
        v1, d1 = dynamics(x_t, t)
        if integrator == "heun":
            v2, d2 = dynamics(x_t + h * v1, s)
            x_t, divergence_integral = x_t + h / 2 * (v1 + v2), divergence_integral + h / 2 * (d1 + d2)
            continue
        v2, d2 = dynamics(x_t + h / 2 * v1, t + h / 2)
        v3, d3 = dynamics(x_t + h / 2 * v2, t + h / 2)
        v4, d4 = dynamics(x_t + h * v3, s)
        x_t = x_t + h / 6 * (v1 + 2 * v2 + 2 * v3 + v4)
        divergence_integral = divergence_integral + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)

    log_likelihood = prior_log_prob(objective, x_t) + divergence_integral.mean(0)
    if probes is None:
        standard_error = torch.zeros_like(log_likelihood)
    elif num_probes == 1:
        standard_error = torch.full_like(log_likelihood, math.nan)
    else:
        standard_error = divergence_integral.std(0) / math.sqrt(num_probes)
    nfe = num_steps * INTEGRATOR_STAGES[integrator] * getattr(model_fn, "nfe_per_call", 1)
    return ODELikelihood(log_likelihood.detach(), standard_error.detach(), x[0].numel(), nfe)
