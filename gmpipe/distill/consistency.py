"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) in the latent-consistency
form of Luo et al. 2023 (LCM, Algorithm 1): the (guided) teacher's DDIM step is the ODE solver, and the student's
consistency function f(x_t, t) (``gmpipe.diffusion.consistency``) maps every point of a teacher ODE trajectory to
its end at t = 0. LCM's skipping step k is the coarseness of the training grid: `num_intervals` steps of
`time_grid(num_intervals, shift)`.

The student keeps the teacher's objective and is sampled with the "consistency" sampler
(``gmpipe.diffusion.consistency.consistency_sample``, Song et al. 2023, Algorithm 1).

Shapes: x, x_t, predictions (B, ...); times (B,). Time convention: t = 0 data, t = 1 noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gmpipe.diffusion.consistency import SIGMA_DATA, TIME_SCALE, consistency_function
from gmpipe.diffusion.noise import standard_normal, standard_uniform
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.samplers import ddim_step, time_grid

ModelFn = Callable[[Tensor, Tensor], Tensor]  # model_fn(x_t (B, ...), t (B,)) -> prediction (B, ...)



def pseudo_huber(squared_error: Tensor, c: float) -> Tensor:
    """sqrt(e + c^2) - c for a mean squared error e (B,): the pseudo-Huber distance of Song & Dhariwal 2023
    ("Improved Techniques for Training Consistency Models"), about e / 2c for small errors, sqrt(e) for large."""
    return (squared_error + c**2).sqrt() - c


def consistency_distillation_loss(
    student_fn: ModelFn,
    target_fn: ModelFn,
    teacher_fn: ModelFn,
    objective: Objective,
    x: Tensor,
    num_intervals: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    huber_c: float | None = None,
    sigma_data: float = SIGMA_DATA,
    time_scale: float = TIME_SCALE,
) -> Tensor:
    """Per-sample consistency distillation loss, Song et al. 2023, Algorithm 2 (LCM, Algorithm 1). Returns (B,).

    For each sample: a step t_{n+1} -> t_n of `time_grid(num_intervals, shift)` drawn uniformly, z ~ N(0, I),
    x_{t_{n+1}} = a x + b z; the teacher's DDIM step gives x_hat_{t_n} (without gradient); the loss is
    d(f_student(x_{t_{n+1}}, t_{n+1}), f_target(x_hat_{t_n}, t_n)) with the target side without gradient
    and d the mean squared error over the non-batch dimensions, or its pseudo-Huber (`huber_c`). Uniform
    weighting lambda = 1, as in LCM.

    student_fn: the model being trained; target_fn: theta^- (an EMA copy, or the student itself: the
    stop-gradient target of Song & Dhariwal 2023); teacher_fn: the teacher, guided at a fixed w by the
    caller for an LCM-style guidance-distilled student. All are (x_t, t) -> prediction in objective.target.
    x: (B, ...) data.
    """
    grid = time_grid(num_intervals, shift=shift, device=x.device, dtype=x.dtype)  # (N + 1,) from 1 to 0
    u = standard_uniform((x.shape[0],), generator=generator, device=x.device)
    index = (u * num_intervals).long().clamp_max(num_intervals - 1)
    t_high, t_low = grid[index], grid[index + 1]
    z = standard_normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
    x_high = objective.interpolate(x, z, t_high)
    scalings = {"sigma_data": sigma_data, "time_scale": time_scale}
    with torch.no_grad():
        x_low = ddim_step(teacher_fn, objective, x_high, t_high, t_low)
        target = consistency_function(target_fn, objective, x_low, t_low, **scalings)
    prediction = consistency_function(student_fn, objective, x_high, t_high, **scalings)
    squared_error = (prediction - target).square().flatten(1).mean(1)
    return squared_error if huber_c is None else pseudo_huber(squared_error, huber_c)
