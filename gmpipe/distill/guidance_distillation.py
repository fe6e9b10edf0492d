"""Guidance distillation at a fixed weight (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
stage one): a plain conditional student learns the classifier-free guided teacher's prediction, so that
sampling it costs 1 network evaluation per step instead of 2, with the teacher's sampler and step count.

Meng et al. condition the student on w; here w is fixed (the student has the teacher's architecture and no
w input). The result can be sampled as is, or be the unguided teacher of `progressive` rounds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gmpipe.diffusion.noise import standard_normal
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.times import as_time

ModelFn = Callable[[Tensor, Tensor], Tensor]  # model_fn(x_t (B, ...), t (B,)) -> prediction (B, ...)


def guidance_distillation_loss(
    student_fn: ModelFn,
    guided_teacher_fn: ModelFn,
    objective: Objective,
    x: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample loss w(t) * mean((student_fn(x_t, t) - guided_teacher_fn(x_t, t))^2): the stage-one loss
    of Meng et al. 2023 at a fixed w, in the objective's target space. Returns (B,).

    t ~ objective.time_density and z ~ N(0, I) with `generator`, x_t = a(t) x + b(t) z, w(t) the objective's
    weighting. Meng et al. write the loss on data estimates with a weight omega(lambda_t); at a fixed x_t a
    target-space error is (det / b) times the data-space error (gmpipe.diffusion.weightings), so this is
    their loss with the time weighting the teacher was trained with. guided_teacher_fn is typically
    `make_guided_model_fn(lambda x, t, c: teacher(x, t, c), cond, null_cond, w)`; it runs without gradient.
    x: (B, ...) data.
    """
    t = objective.time_density.sample(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    t = as_time(t, x)
    z = standard_normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
    x_t = objective.interpolate(x, z, t)
    with torch.no_grad():
        target = guided_teacher_fn(x_t, t)
    squared_error = (student_fn(x_t, t) - target).square().flatten(1).mean(1)
    return objective.weighting.weight(objective.schedule, objective.target, t) * squared_error
