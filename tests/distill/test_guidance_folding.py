"""Guidance folded into a plain conditional student, on class-conditional Gaussians with an exact teacher:
progressive distillation from the guided teacher, and guidance distillation (Meng et al. 2023, stage one)."""

from __future__ import annotations

import torch

from gmpipe.diffusion import Objective, get_schedule, get_target, make_guided_model_fn
from gmpipe.diffusion.samplers import ddim
from gmpipe.distill.guidance_distillation import guidance_distillation_loss
from gmpipe.distill.progressive import progressive_distillation_loss
from tests.distill.toys import DTYPE, ClassConditionalGaussians, MLPStudent, fit

TOY = ClassConditionalGaussians(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], std=0.5)
OBJECTIVE = Objective(get_schedule("rectified_flow"), get_target("velocity"))
W = 2.0  # pred = (1 + w) pred_cond - w pred_uncond


def guided_teacher(cond: torch.Tensor, w: float = W):
    return make_guided_model_fn(TOY.denoiser_fn(OBJECTIVE), cond, TOY.null_cond, w)


def distill_one_step_student(w: float) -> MLPStudent:
    """One progressive round from the teacher guided at w (2 DDIM steps) to a 1-step conditional student."""
    student = MLPStudent(2, cond_dim=3)
    generator = torch.Generator().manual_seed(0)

    def batch_loss():
        x, cond = TOY.sample(256, generator)
        return progressive_distillation_loss(
            lambda x_t, t: student(x_t, t, cond), guided_teacher(cond, w), OBJECTIVE, x, 1, generator=generator
        ).mean()

    fit(student, batch_loss, steps=600, lr=1e-2)
    return student


def evaluation_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    _, cond = TOY.sample(2000, generator)
    return torch.randn(2000, 2, generator=generator, dtype=DTYPE), cond


def mse(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first - second).square().mean().item()


def test_progressive_round_from_a_guided_teacher_folds_the_guidance_into_the_student():
    noise, cond = evaluation_batch()
    guided_two_steps, guided_nfe = ddim(guided_teacher(cond), OBJECTIVE, noise, 2)
    guided_one_step, _ = ddim(guided_teacher(cond), OBJECTIVE, noise, 1)
    unguided_two_steps, _ = ddim(guided_teacher(cond, w=0.0), OBJECTIVE, noise, 2)
    student = distill_one_step_student(W)
    student_sample, student_nfe = ddim(lambda x_t, t: student(x_t, t, cond), OBJECTIVE, noise, 1)
    unguided_student = distill_one_step_student(0.0)
    unguided_student_sample, _ = ddim(lambda x_t, t: unguided_student(x_t, t, cond), OBJECTIVE, noise, 1)

    errors = {
        "guided student, 1 step": mse(student_sample, guided_two_steps),
        "guided teacher, 1 step": mse(guided_one_step, guided_two_steps),
        "unguided teacher, 2 steps": mse(unguided_two_steps, guided_two_steps),
        "unguided student, 1 step": mse(unguided_student_sample, guided_two_steps),
    }
    print("MSE to the guided teacher's 2-step sample:", {name: f"{value:.2e}" for name, value in errors.items()})
    assert (guided_nfe, student_nfe) == (4, 1)  # 2 steps x (cond + uncond) vs 1 step x 1 evaluation
    assert errors["guided student, 1 step"] < 0.1 * min(value for name, value in errors.items() if "unguided" in name)
    assert errors["guided student, 1 step"] < 0.1 * errors["guided teacher, 1 step"]


def test_guidance_distillation_matches_the_guided_prediction_at_every_time():
    student = MLPStudent(2, cond_dim=3)
    generator = torch.Generator().manual_seed(0)

    def batch_loss():
        x, cond = TOY.sample(256, generator)
        return guidance_distillation_loss(
            lambda x_t, t: student(x_t, t, cond), guided_teacher(cond), OBJECTIVE, x, generator=generator
        ).mean()

    fit(student, batch_loss, steps=1500, lr=1e-2)
    noise, cond = evaluation_batch()
    steps = 8  # the student replaces the guided teacher in the teacher's own sampler
    guided, guided_nfe = ddim(guided_teacher(cond), OBJECTIVE, noise, steps)
    unguided, _ = ddim(guided_teacher(cond, w=0.0), OBJECTIVE, noise, steps)
    student_sample, student_nfe = ddim(lambda x_t, t: student(x_t, t, cond), OBJECTIVE, noise, steps)
    student_error, unguided_error = mse(student_sample, guided), mse(unguided, guided)
    print(f"{steps}-step DDIM, MSE to the guided teacher: student {student_error:.4f}, unguided {unguided_error:.4f}")
    assert (guided_nfe, student_nfe) == (2 * steps, steps)
    assert student_error < 0.05 * unguided_error
