"""Each distillation method as a loss for the shared training loop (gmpipe.train.loop.LossStep):
loss(batch, step, context, modules) -> (mean loss, {"loss": detached mean}).

The student is `modules[student]` (the LossStep's module), called as student(x_t, t, cond) with the same
conditions the teacher sees (no null condition, no guidance: a fixed w is folded into it). The teacher is a
frozen denoiser_fn(x_t, t, cond) captured by the closure, not a LossStep module: the stage freezes it, puts
it in eval mode and on the loop's device (the loop moves only its own modules). Guidance and
null_condition follow gmpipe.distill.teacher.

Batches: (x, cond) as train_ldm's make_batch gives them (cond may be None) for the methods that draw x_t
from data; (z, x, cond) rows of `reflow.Couplings` for reflow. Randomness (times, noise) comes from the
global torch RNG, which the loop seeds.
"""

from __future__ import annotations

from torch import Tensor

from gmpipe.diffusion.guidance import DenoiserFn
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.time_density import TimeDensity
from gmpipe.distill.consistency import consistency_distillation_loss
from gmpipe.distill.guidance_distillation import guidance_distillation_loss
from gmpipe.distill.progressive import progressive_distillation_loss
from gmpipe.distill.reflow import reflow_loss
from gmpipe.distill.teacher import NullCondition, guided_teacher_fn
from gmpipe.train.step import LossFn


def _reported(per_sample: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    value = per_sample.mean()
    return value, {"loss": value.detach()}


def progressive_loss_fn(
    teacher: DenoiserFn,
    objective: Objective,
    num_student_steps: int,
    *,
    w: float = 0.0,
    null_condition: NullCondition | None = None,
    shift: float = 1.0,
    student: str = "student",
) -> LossFn:
    """One round of `progressive.progressive_distillation_loss` for a student with num_student_steps DDIM
    steps; the teacher (the trained denoiser guided at w in the first round, the previous student with w = 0
    after it) takes two. Batch (x, cond)."""

    def loss(batch, step, context, modules):
        x, cond = batch
        teacher_fn = guided_teacher_fn(teacher, cond, x.shape[0], w, null_condition)
        per_sample = progressive_distillation_loss(
            lambda x_t, t: modules[student](x_t, t, cond), teacher_fn, objective, x, num_student_steps, shift=shift
        )
        return _reported(per_sample)

    return loss


def guidance_loss_fn(
    teacher: DenoiserFn,
    objective: Objective,
    *,
    w: float,
    null_condition: NullCondition,
    student: str = "student",
) -> LossFn:
    """`guidance_distillation.guidance_distillation_loss` against the teacher guided at w. Batch (x, cond)."""

    def loss(batch, step, context, modules):
        x, cond = batch
        teacher_fn = guided_teacher_fn(teacher, cond, x.shape[0], w, null_condition)
        per_sample = guidance_distillation_loss(lambda x_t, t: modules[student](x_t, t, cond), teacher_fn, objective, x)
        return _reported(per_sample)

    return loss


def consistency_loss_fn(
    teacher: DenoiserFn,
    objective: Objective,
    num_intervals: int,
    *,
    w: float = 0.0,
    null_condition: NullCondition | None = None,
    shift: float = 1.0,
    huber_c: float | None = None,
    student: str = "student",
) -> LossFn:
    """`consistency.consistency_distillation_loss` with the student itself (without gradient) as the target
    network theta^- (Song & Dhariwal 2023). Batch (x, cond)."""

    def loss(batch, step, context, modules):
        x, cond = batch
        teacher_fn = guided_teacher_fn(teacher, cond, x.shape[0], w, null_condition)
        student_fn = lambda x_t, t: modules[student](x_t, t, cond)  # noqa: E731
        per_sample = consistency_distillation_loss(
            student_fn, student_fn, teacher_fn, objective, x, num_intervals, shift=shift, huber_c=huber_c
        )
        return _reported(per_sample)

    return loss


def reflow_loss_fn(*, time_density: TimeDensity | None = None, student: str = "student") -> LossFn:
    """`reflow.reflow_loss` on coupling rows. Batch (z, x, cond) from `Couplings.batch`; the student's
    objective is `reflow.reflow_objective()`."""

    def loss(batch, step, context, modules):
        z, x, cond = batch
        return _reported(reflow_loss(lambda x_t, t: modules[student](x_t, t, cond), z, x, time_density=time_density))

    return loss
