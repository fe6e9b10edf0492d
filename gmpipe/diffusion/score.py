"""The score and SDE view of a path x_t = a(t) x + b(t) z (t = 0 data, t = 1 noise).

Score. Given x, x_t ~ N(a x, b^2 I), so grad log p(x_t | x) = -(x_t - a x) / b^2 = -z / b. The marginal score
is the posterior mean of that (Tweedie's formula, Efron 2011; Vincent 2011):

    grad log p_t(x_t) = -E[z | x_t] / b(t) = -z_hat / b(t),

and z_hat comes from any target's prediction through the 2x2 solve (objective.py). So every model trained here is
also a score model.

Forward SDE. The linear SDE dx = f(t) x dt + g(t) dw started at x has the Gaussian transition
N(m(t) x, v(t) I) with m' = f m and v' = 2 f v + g^2 (the moment equations of a linear SDE, Sarkka & Solin
2019, sec. 5.5, as used in Song et al. 2021, appendix B). Matching m = a and v = b^2 gives the SDE of the path:

    f(t) = a'(t) / a(t),        g(t)^2 = d(b^2)/dt - 2 f(t) b(t)^2 = 2 b b' - 2 (a' / a) b^2.

For the variance-preserving schedules (a^2 + b^2 = 1) this is g^2 = -2 a'/a = beta(t), the VP SDE; for rectified
flow f = -1 / (1 - t) and g^2 = 2 t / (1 - t). Both coefficients are infinite where a = 0 (rectified flow and
trigonometric at t = 1): the forward process wipes x out at that instant.

Reverse SDE. The process run backwards in time (Anderson 1982; Song et al. 2021, eq. 6) is
dx = [f x - g^2 grad log p_t(x)] dt + g dw_bar, with dt < 0. The family

    dx = [f x - (1 + eta^2) / 2 g^2 grad log p_t(x)] dt + eta g dw_bar,     eta >= 0,

has the same marginals p_t for every eta (the extra drift -eta^2/2 g^2 grad log p and the noise eta g cancel in
the Fokker-Planck equation): eta = 1 is eq. 6, eta = 0 the probability-flow ODE (Song et al. 2021, eq. 13), whose
drift f x - g^2/2 grad log p equals the velocity a' x_hat + b' z_hat. The drift is therefore computed as

    drift = v + eta^2 / 2 g^2 z_hat / b = v + eta^2 (b' - f b) z_hat,

which is exactly the ODE velocity at eta = 0 and avoids dividing b^2 by b at t = 0.
Shapes: x_t, prediction and the results are (B, ...); t is a float or (B,).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.schedules import MIN_NOISE_SCALE, Schedule
from gmpipe.diffusion.times import as_time, expand_like


def score(objective: Objective, prediction: Tensor, x_t: Tensor, t: float | Tensor) -> Tensor:
    """grad log p_t(x_t) = -z_hat / b(t) (Tweedie's formula, module docstring) from a prediction in any target.

    prediction, x_t: (B, ...); t: float or (B,), with t > 0 (b(0) = 0: the data score is not defined by a
    denoiser; b is clamped at MIN_NOISE_SCALE). Returns (B, ...).
    """
    t = as_time(t, x_t)
    _, z_hat = objective.to_data_and_noise(prediction, x_t, t)
    return -z_hat / expand_like(objective.schedule.b(t).clamp_min(MIN_NOISE_SCALE), x_t)


def drift_coefficient(schedule: Schedule, t: Tensor) -> Tensor:
    """f(t) = a'(t) / a(t), the linear drift of the forward SDE dx = f x dt + g dw whose marginals are the path
    (module docstring). Infinite where a(t) = 0. Shaped like t."""
    return schedule.da(t) / schedule.a(t)


def diffusion_squared(schedule: Schedule, t: Tensor) -> Tensor:
    """g(t)^2 = d(b^2)/dt - 2 f(t) b(t)^2 = 2 b b' - 2 (a'/a) b^2, the squared diffusion of the forward SDE
    (beta(t) for variance-preserving schedules, 2 t / (1 - t) for rectified flow). Infinite where a(t) = 0.
    Shaped like t."""
    b = schedule.b(t)
    return 2 * b * schedule.db(t) - 2 * drift_coefficient(schedule, t) * b.square()


def reverse_sde_drift(
    objective: Objective, prediction: Tensor, x_t: Tensor, t: float | Tensor, eta: float | Tensor = 1.0
) -> Tensor:
    """Drift of the reverse-time SDE family f x - (1 + eta^2)/2 g^2 grad log p_t(x) (Song et al. 2021, eq. 6 at
    eta = 1, the probability-flow ODE of eq. 13 at eta = 0), computed as v + eta^2 (b' - f b) z_hat (module
    docstring). dx/dt along the reverse process: a step toward data multiplies it by a negative dt.

    prediction, x_t: (B, ...); t: float or (B,); eta: float or (B,) per-sample stochasticity, >= 0. Where
    a(t) = 0 the drift is finite only for eta = 0 (f is infinite there). Returns (B, ...).
    """
    t = as_time(t, x_t)
    velocity = objective.velocity(prediction, x_t, t)
    eta = torch.as_tensor(eta, dtype=x_t.dtype, device=x_t.device)
    if not eta.any():
        return velocity
    _, z_hat = objective.to_data_and_noise(prediction, x_t, t)
    schedule = objective.schedule
    score_drift = schedule.db(t) - drift_coefficient(schedule, t) * schedule.b(t)  # (g^2 / 2b), (B,)
    # eta = 0 rows contribute nothing, even where score_drift is infinite (a = 0)
    scaled = torch.where(eta > 0, eta.square() * score_drift, torch.zeros_like(score_drift))
    return velocity + expand_like(scaled, x_t) * z_hat
