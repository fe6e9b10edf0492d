"""Progressive distillation on a Gaussian toy with an exact teacher: the 2x2 target, the grid, one round."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import Objective, get_schedule, get_target
from gmpipe.diffusion.samplers import ddim, ddim_step, time_grid
from gmpipe.distill.progressive import (
    ddim_data_target,
    halving_schedule,
    progressive_distillation_loss,
    sample_student_interval,
    teacher_two_ddim_steps,
)
from tests.distill.toys import DTYPE, AffineStudent, GaussianMixture, fit

# pairs whose 2x2 system is regular on (0, 1] (epsilon only where a(1) > 0)
REGULAR_PAIRS = [
    ("rectified_flow", "velocity"),
    ("rectified_flow", "data"),
    ("vp_linear", "epsilon"),
    ("vp_cosine", "v_prediction"),
    ("trigonometric", "v_prediction"),
]


def gaussian_toy() -> GaussianMixture:
    return GaussianMixture(means=[[1.0, -0.5]], stds=[[0.5, 2.0]], weights=[1.0])


def test_halving_schedule():
    assert halving_schedule(32, 1) == [32, 16, 8, 4, 2, 1]
    assert halving_schedule(8, 2) == [8, 4, 2]
    assert halving_schedule(4, 4) == [4]
    with pytest.raises(ValueError):
        halving_schedule(12, 1)
    with pytest.raises(ValueError):
        halving_schedule(2, 4)


def test_student_intervals_are_steps_of_the_student_grid():
    generator = torch.Generator().manual_seed(0)
    t, mid, s = sample_student_interval(4, 1000, shift=3.0, generator=generator)
    coarse, fine = time_grid(4, shift=3.0), time_grid(8, shift=3.0)
    index = (t[:, None] == coarse[None, :-1]).float().argmax(1)
    assert torch.equal(t, coarse[index]) and torch.equal(s, coarse[index + 1]) and torch.equal(mid, fine[2 * index + 1])
    assert (t > mid).all() and (mid > s).all()
    assert torch.bincount(index, minlength=4).min() > 200  # every step is drawn (1000 / 4 expected)


@pytest.mark.parametrize("schedule, target", REGULAR_PAIRS)
def test_one_ddim_step_from_the_data_target_lands_on_x_s(schedule, target):
    # x_tilde predicts, in the objective's own target, exactly what makes one DDIM step land on x_s
    objective = Objective(get_schedule(schedule), get_target(target))
    generator = torch.Generator().manual_seed(1)
    t = torch.rand(64, generator=generator, dtype=DTYPE) * 0.9 + 0.1
    s = t * torch.rand(64, generator=generator, dtype=DTYPE) * 0.9
    s[:8] = 0.0
    x_t, x_s = torch.randn(2, 64, 3, generator=generator, dtype=DTYPE)
    x_tilde = ddim_data_target(objective, x_t, x_s, t, s)
    a_t, b_t = objective.schedule.a(t)[:, None], objective.schedule.b(t)[:, None]
    prediction = objective.from_data_and_noise(x_tilde, (x_t - a_t * x_tilde) / b_t, t)
    landed = ddim_step(lambda x, time: prediction, objective, x_t, t, s)
    torch.testing.assert_close(landed, x_s, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x_tilde[:8], x_s[:8])  # s = 0: the target is x_s itself


def test_the_exact_teacher_is_a_fixed_point_of_its_own_loss_on_a_point_mass():
    # for point-mass data DDIM is exact in any number of steps, so the teacher as its own student has loss 0
    objective = Objective(get_schedule("trigonometric"), get_target("v_prediction"))
    point = GaussianMixture(means=[[0.7, -1.2]], stds=[[1e-6, 1e-6]], weights=[1.0])
    teacher = point.model_fn(objective)
    x = point.sample(128, torch.Generator().manual_seed(0))
    loss = progressive_distillation_loss(teacher, teacher, objective, x, 4, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (128,) and loss.max() < 1e-8


def step_errors(student_fn, teacher_fn, objective, num_student_steps, toy, n=2000):
    """Mean squared distance to the teacher's two DDIM steps over every student step t -> s, from x_t on the
    true marginal: (student's one step, teacher's one step)."""
    generator = torch.Generator().manual_seed(123)
    coarse, fine = time_grid(num_student_steps, dtype=DTYPE), time_grid(2 * num_student_steps, dtype=DTYPE)
    student_error = teacher_error = 0.0
    for i in range(num_student_steps):
        t, mid, s = (torch.full((n,), v.item(), dtype=DTYPE) for v in (coarse[i], fine[2 * i + 1], coarse[i + 1]))
        z = torch.randn(n, toy.dim, generator=generator, dtype=DTYPE)
        x_t = objective.interpolate(toy.sample(n, generator), z, t)
        two_steps = teacher_two_ddim_steps(teacher_fn, objective, x_t, t, mid, s)
        with torch.no_grad():
            student_error += (ddim_step(student_fn, objective, x_t, t, s) - two_steps).square().mean().item()
            teacher_error += (ddim_step(teacher_fn, objective, x_t, t, s) - two_steps).square().mean().item()
    return student_error / num_student_steps, teacher_error / num_student_steps


@pytest.mark.parametrize("schedule, target", [("rectified_flow", "velocity"), ("vp_linear", "epsilon")])
def test_one_round_makes_one_student_step_match_two_teacher_steps(schedule, target):
    objective = Objective(get_schedule(schedule), get_target(target))
    toy, num_student_steps = gaussian_toy(), 2
    teacher = toy.model_fn(objective)
    student = AffineStudent(toy.dim)
    generator = torch.Generator().manual_seed(0)

    def batch_loss():
        x = toy.sample(256, generator)
        return progressive_distillation_loss(
            lambda x_t, t: student(x_t, t), teacher, objective, x, num_student_steps, generator=generator
        ).mean()

    fit(student, batch_loss, steps=400, lr=0.05)
    student_fn = lambda x_t, t: student(x_t, t)  # noqa: E731
    student_error, teacher_error = step_errors(student_fn, teacher, objective, num_student_steps, toy)
    print(f"{schedule}-{target}: per-step MSE to 2 teacher steps: student {student_error:.2e}, "
          f"teacher {teacher_error:.2e}")
    assert student_error < 0.01 * teacher_error

    # and the whole 2-step student chain follows the teacher's 4-step DDIM chain from the same noise
    noise = torch.randn(2000, toy.dim, generator=generator, dtype=DTYPE)
    teacher_samples, _ = ddim(teacher, objective, noise, 2 * num_student_steps)
    student_samples, _ = ddim(lambda x_t, t: student(x_t, t), objective, noise, num_student_steps)
    teacher_short, _ = ddim(teacher, objective, noise, num_student_steps)
    student_gap = (student_samples - teacher_samples).square().mean()
    teacher_gap = (teacher_short - teacher_samples).square().mean()
    print(f"  sample MSE to the 4-step teacher: 2-step student {student_gap:.2e}, 2-step teacher {teacher_gap:.2e}")
    assert student_gap < 0.01 * teacher_gap
