"""Progressive distillation (Salimans & Ho 2022, Algorithm 2), for any (schedule, target) pair.

A student with N deterministic DDIM steps on the grid `time_grid(N, shift)` is trained so that each of its
steps t -> s lands where two DDIM steps t -> mid -> s of the teacher (2N steps, on `time_grid(2N, shift)`,
whose even points are the student's grid) land. The student is then the teacher of the next round with N / 2
steps (`halving_schedule`), and is initialised from its teacher's weights (the caller copies them).

Everything is written with the path x_t = a(t) x + b(t) z and the 2x2 conversions of `Objective`, so the
same code distills a flow-matching velocity model, an epsilon or a v-prediction model: the student's
prediction is turned into its data estimate x_hat, the quantity the paper's loss is written in. The
student's target must make the 2x2 system regular at every student time, e.g. not epsilon on a path with
a(1) = 0 (rectified flow, trigonometric); the paper advises against epsilon for few-step students anyway.

Guidance: the first round's teacher may be classifier-free guided at a fixed w
(`make_guided_model_fn(teacher, cond, null_cond, w)`), the student a plain conditional model called with
cond only; guidance is then folded into the student (1 network evaluation per step instead of 2), and later
rounds distill the previous student unguided.

Shapes: x, x_t, x_s, predictions (B, ...); times (B,). Time convention: t = 0 data, t = 1 noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gmpipe.diffusion.noise import standard_normal, standard_uniform
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.samplers import ddim_step, time_grid
from gmpipe.diffusion.schedules import Schedule
from gmpipe.diffusion.targets import MIN_DETERMINANT, guard_determinant
from gmpipe.diffusion.times import expand_like

ModelFn = Callable[[Tensor, Tensor], Tensor]  # model_fn(x_t (B, ...), t (B,)) -> prediction (B, ...)
DataWeighting = Callable[[Schedule, Tensor], Tensor]  # weighting(schedule, t (B,)) -> (B,)


def halving_schedule(start_steps: int, final_steps: int = 1) -> list[int]:
    """Student step counts of the successive rounds: [start_steps, start_steps / 2, ..., final_steps].

    start_steps is the first student's step count (its teacher samples with 2 start_steps DDIM steps);
    e.g. halving_schedule(32, 1) = [32, 16, 8, 4, 2, 1]. start_steps / final_steps must be a power of 2.
    """
    if final_steps < 1 or start_steps < final_steps:
        raise ValueError(f"need start_steps >= final_steps >= 1, got {start_steps} and {final_steps}")
    ratio, remainder = divmod(start_steps, final_steps)
    if remainder or ratio & (ratio - 1):
        raise ValueError(f"start_steps / final_steps must be a power of 2, got {start_steps} / {final_steps}")
    rounds = [start_steps]
    while rounds[-1] > final_steps:
        rounds.append(rounds[-1] // 2)
    return rounds


def sample_student_interval(
    num_student_steps: int,
    batch_size: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """(t, mid, s), each (B,): a uniformly drawn step t -> s of the student grid `time_grid(N, shift)` and
    the teacher's intermediate time mid on `time_grid(2N, shift)`, so 1 >= t > mid > s >= 0.

    Algorithm 2 of Salimans & Ho 2022 draws t = i / N, i ~ U{1, ..., N}; this is the same with the
    (optionally resolution-shifted) sampling grid the student will use.
    """
    fine = time_grid(2 * num_student_steps, shift=shift, device=device, dtype=dtype)  # (2N + 1,) from 1 to 0
    u = standard_uniform((batch_size,), generator=generator, device=device)
    index = (u * num_student_steps).long().clamp_max(num_student_steps - 1)  # step i: grid[i] -> grid[i + 1]
    return fine[2 * index], fine[2 * index + 1], fine[2 * index + 2]


@torch.no_grad()
def teacher_two_ddim_steps(
    teacher_fn: ModelFn, objective: Objective, x_t: Tensor, t: Tensor, mid: Tensor, s: Tensor
) -> Tensor:
    """Algorithm 2's teacher: two deterministic DDIM steps t -> mid -> s (Song et al. 2021, eq. 12).
    Returns x_s'' (B, ...), without gradient. Two teacher calls (each 2 network evaluations if guided)."""
    x_mid = ddim_step(teacher_fn, objective, x_t, t, mid)
    return ddim_step(teacher_fn, objective, x_mid, mid, s)


def ddim_data_target(
    objective: Objective, x_t: Tensor, x_s: Tensor, t: Tensor, s: Tensor, eps: float = MIN_DETERMINANT
) -> Tensor:
    """The data estimate x_tilde whose single DDIM step from x_t at t lands exactly on x_s at s.

    Salimans & Ho 2022, Algorithm 2: x_tilde = (x_s - (b_s / b_t) x_t) / (a_s - (b_s / b_t) a_t), from
    x_s = a_s x_tilde + b_s (x_t - a_t x_tilde) / b_t (a DDIM step with z_hat implied by x_tilde). Written
    here as (b_t x_s - b_s x_t) / (a_s b_t - b_s a_t), with the denominator clamped at eps in magnitude:
    it is > 0 for s < t on every path whose a / b decreases in t, and vanishes only when t = s.
    x_t, x_s: (B, ...); t, s: (B,). Returns (B, ...).
    """
    schedule = objective.schedule
    a_t, b_t = expand_like(schedule.a(t), x_t), expand_like(schedule.b(t), x_t)
    a_s, b_s = expand_like(schedule.a(s), x_t), expand_like(schedule.b(s), x_t)
    denominator = guard_determinant(a_s * b_t - b_s * a_t, eps)
    return (b_t * x_s - b_s * x_t) / denominator


def truncated_snr_weight(schedule: Schedule, t: Tensor) -> Tensor:
    """max(SNR(t), 1), the "truncated SNR" weighting of the data-space loss (Salimans & Ho 2022, sec. 4):
    epsilon-like at high SNR, and still weighting t with SNR -> 0 (where epsilon-MSE weight vanishes).
    t: (B,). Returns (B,)."""
    return schedule.snr(t).clamp_min(1.0)


def snr_plus_one_weight(schedule: Schedule, t: Tensor) -> Tensor:
    """SNR(t) + 1, the "SNR+1" weighting of Salimans & Ho 2022 (sec. 4); equals the v-MSE on VP paths."""
    return schedule.snr(t) + 1


def progressive_distillation_loss(
    student_fn: ModelFn,
    teacher_fn: ModelFn,
    objective: Objective,
    x: Tensor,
    num_student_steps: int,
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    weighting: DataWeighting = truncated_snr_weight,
) -> Tensor:
    """Per-sample progressive distillation loss, Salimans & Ho 2022, Algorithm 2. Returns (B,).

    For each sample: a student step (t, s) of `time_grid(N, shift)` (`sample_student_interval`), z ~ N(0, I)
    and x_t = a(t) x + b(t) z; the teacher's two DDIM steps give x_s'' (`teacher_two_ddim_steps`); the
    data target is x_tilde (`ddim_data_target`); the loss is weighting(t) * mean((x_hat - x_tilde)^2) with
    x_hat the student's data estimate from student_fn(x_t, t) via the objective's 2x2 conversion.

    student_fn, teacher_fn: (x_t (B, ...), t (B,)) -> prediction in objective.target, with the condition
    (and, for the teacher, guidance) bound by the caller. Both share `objective` (same path and target).
    x: (B, ...) data (latents). The teacher runs without gradient; reduce the result with .mean().
    After training, sample the student with `ddim(student_fn, objective, noise, N, shift=shift)`.
    """
    t, mid, s = sample_student_interval(
        num_student_steps, x.shape[0], shift=shift, generator=generator, device=x.device, dtype=x.dtype
    )
    z = standard_normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
    x_t = objective.interpolate(x, z, t)
    x_s = teacher_two_ddim_steps(teacher_fn, objective, x_t, t, mid, s)
    x_tilde = ddim_data_target(objective, x_t, x_s, t, s)
    x_hat, _ = objective.to_data_and_noise(student_fn(x_t, t), x_t, t)
    return weighting(objective.schedule, t) * (x_hat - x_tilde).square().flatten(1).mean(1)
