"""Distillation: a trained (guided) denoiser into a student that samples in a few network evaluations.

Methods (one module each; every one has a per-sample loss (B,) and a `loop_losses` adapter for the shared
training loop's LossStep):

    progressive            Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student with N DDIM
                           steps matches its teacher's 2N; rounds halve N (`halving_schedule`). Any (schedule,
                           target) through the 2x2 conversions. Student: teacher's objective, sampled with
                           `ddim` on `time_grid(N, shift)`.
    reflow                 Rectified-flow reflow (Liu et al. 2022): a velocity student on the straight paths
                           between the teacher's (noise, sample) couplings. Student: `reflow_objective()`
                           (rectified_flow + velocity, whatever the teacher's), sampled with `euler` in 1-2 steps.
    guidance_distillation  Guidance distillation at a fixed w (Meng et al. 2023, stage one): a plain
                           conditional student matches the guided prediction. Student: teacher's objective
                           and sampler, half the network evaluations.
    consistency            Consistency distillation (Song et al. 2023, Algorithm 2; LCM, Luo et al. 2023):
                           skip/out-parameterized consistency function, teacher DDIM steps as the ODE solver.
                           Student: teacher's objective, sampled with `consistency_sample`.

Guidance: a teacher guided at a fixed w (`teacher.guided_teacher_fn`) distills into a plain conditional
student of the same architecture, 1 network evaluation per step (the student has no w input).

Shared modules: `teacher` (binding cond, null cond and w into a model_fn(x_t, t)) and `loop_losses`
(loss(batch, step, context, modules) factories). Time convention and shapes: gmpipe.diffusion.

`DISTILL_METHODS` names each method's per-sample loss, how its student is sampled (a function with the
gmpipe.diffusion sampler signature) and which objective the student is saved with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from gmpipe.diffusion.samplers import Sampler, ddim, euler
from gmpipe.distill.consistency import consistency_distillation_loss, consistency_sample
from gmpipe.distill.guidance_distillation import guidance_distillation_loss
from gmpipe.distill.progressive import halving_schedule, progressive_distillation_loss
from gmpipe.distill.reflow import Couplings, make_couplings, reflow_loss, reflow_objective, teacher_sample_fn


@dataclass(frozen=True)
class DistillMethod:
    """A distillation method: its per-sample loss (B,), the sampler its student is meant for (None: the
    teacher's own sampler), whether the student keeps the teacher's objective (False: `reflow_objective()`),
    and the paper."""

    name: str
    loss: Callable[..., Tensor]
    student_sampler: Sampler | None
    keeps_teacher_objective: bool
    paper: str


DISTILL_METHODS: dict[str, DistillMethod] = {
    method.name: method
    for method in (
        DistillMethod("progressive", progressive_distillation_loss, ddim, True,
                      "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models"),
        DistillMethod("reflow", reflow_loss, euler, False,
                      "Liu et al. 2022, Flow Straight and Fast: Learning to Generate and Transfer Data with "
                      "Rectified Flow"),
        DistillMethod("guidance", guidance_distillation_loss, None, True,
                      "Meng et al. 2023, On Distillation of Guided Diffusion Models"),
        DistillMethod("consistency", consistency_distillation_loss, consistency_sample, True,
                      "Song et al. 2023, Consistency Models; Luo et al. 2023, Latent Consistency Models"),
    )
}


def get_distill_method(name: str) -> DistillMethod:
    """The method registered as `name` ("progressive", "reflow", "guidance", "consistency")."""
    if name not in DISTILL_METHODS:
        raise ValueError(f"unknown distillation method {name!r}; choose one of {sorted(DISTILL_METHODS)}")
    return DISTILL_METHODS[name]


__all__ = [
    "DISTILL_METHODS",
    "Couplings",
    "DistillMethod",
    "consistency_distillation_loss",
    "consistency_sample",
    "get_distill_method",
    "guidance_distillation_loss",
    "halving_schedule",
    "make_couplings",
    "progressive_distillation_loss",
    "reflow_loss",
    "reflow_objective",
    "teacher_sample_fn",
]
