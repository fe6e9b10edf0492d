"""Generalized diffusion and flow matching: x_t = a(t) x + b(t) z, trained on y = c(t) x + d(t) z.

Time convention (written here once, used by every module in this package):
    t = 0 is data, t = 1 is noise. x is a data sample, z ~ N(0, I) is noise of the same shape, and
    x_t = a(t) x + b(t) z, so a(0) = 1, b(0) = 0 and a(1) ~ 0, b(1) ~ 1 (exact for rectified flow and
    trigonometric paths; the variance-preserving schedules keep a(1) slightly above 0, see schedules.py).
    Samplers integrate from t = 1 down to t = 0.

Shapes: x, z, x_t and every prediction are (B, ...) with the batch first; a time t is a (B,) tensor of
per-sample times (a float is accepted where noted and broadcast to the batch).

Modules, one concept each:
    schedules     a(t), b(t) and their derivatives: the path from data to noise
    targets       c(t), d(t): what the network predicts
    weightings    w(t): per-time loss weight
    time_density  p(t): how training times are drawn, plus the resolution shift
    objective     Objective = schedule x target x time density x weighting; the 2x2 conversions and the loss
    samplers      Euler, Heun, DDIM, DDPM-ancestral and reverse-SDE samplers returning (samples, NFE)
    solvers       diffusers' DPM-Solver++ (2M), UniPC and flow-matching Euler as samplers on any objective
    consistency   the consistency function and its multistep sampler (Song et al. 2023)
    score         the score -z_hat / b, the forward SDE (f, g^2) of a path and the reverse-SDE drift
                  (import score() from gmpipe.diffusion.score: re-exported here it would hide the module)
    likelihood    log p_0(x) under the probability-flow ODE (Hutchinson or exact trace), bits per dimension
    guidance      classifier-free guidance and condition dropout
    times         per-sample time broadcasting and the sampling time grid
    noise         reproducible random draws with an optional generator (one stream, or one per sample)

Schedules, targets, time densities, weightings and samplers are registered by name in gmpipe.registry (re-exported
here as SCHEDULES, TARGETS, TIME_DENSITIES, WEIGHTINGS and SAMPLERS).
"""

from gmpipe.diffusion.guidance import (
    GuidedModelFn,
    drop_conditions,
    drop_text_conditions,
    guided_prediction,
    make_guided_model_fn,
)
from gmpipe.diffusion.likelihood import ODELikelihood, bits_per_dim, normalization_log_det, ode_log_likelihood
from gmpipe.diffusion.objective import Objective, solve_data_and_noise
from gmpipe.diffusion.samplers import get_sampler
from gmpipe.diffusion.schedules import Schedule, get_schedule
from gmpipe.diffusion.score import diffusion_squared, drift_coefficient, reverse_sde_drift
from gmpipe.diffusion.targets import Target, get_target
from gmpipe.diffusion.time_density import TimeDensity, get_time_density, resolution_shift
from gmpipe.diffusion.weightings import Weighting, get_weighting
from gmpipe.registry import SAMPLERS, SCHEDULES, TARGETS, TIME_DENSITIES, WEIGHTINGS

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "TARGETS",
    "TIME_DENSITIES",
    "WEIGHTINGS",
    "GuidedModelFn",
    "ODELikelihood",
    "Objective",
    "Schedule",
    "Target",
    "TimeDensity",
    "Weighting",
    "bits_per_dim",
    "diffusion_squared",
    "drift_coefficient",
    "drop_conditions",
    "drop_text_conditions",
    "get_sampler",
    "get_schedule",
    "get_target",
    "get_time_density",
    "get_weighting",
    "guided_prediction",
    "make_guided_model_fn",
    "normalization_log_det",
    "ode_log_likelihood",
    "resolution_shift",
    "reverse_sde_drift",
    "solve_data_and_noise",
]
