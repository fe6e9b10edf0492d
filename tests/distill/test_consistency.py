"""Consistency distillation on a Gaussian toy with an exact teacher: the boundary condition, and a
student whose single step lands where the teacher's whole DDIM chain does."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import Objective, get_schedule, get_target
from gmpipe.diffusion.consistency import boundary_scalings, consistency_function, consistency_sample
from gmpipe.diffusion.samplers import ddim, ddim_step
from gmpipe.distill.consistency import consistency_distillation_loss, pseudo_huber
from tests.distill.toys import DTYPE, AffineStudent, GaussianMixture, fit

TOY = GaussianMixture(means=[[1.0, -0.5]], stds=[[0.5, 2.0]], weights=[1.0])


def test_boundary_condition_and_scalings():
    objective = Objective(get_schedule("vp_linear"), get_target("epsilon"))
    x = torch.randn(5, 3, dtype=DTYPE)
    wild_model = lambda x_t, t: 100 * torch.ones_like(x_t)  # noqa: E731
    torch.testing.assert_close(consistency_function(wild_model, objective, x, torch.zeros(5, dtype=DTYPE)), x)
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 1.0], dtype=DTYPE))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-8 and abs(c_out[1] - 1) < 1e-8
    torch.testing.assert_close(pseudo_huber(torch.tensor([0.0, 1e-6, 100.0]), 0.01), torch.tensor([0.0, 5e-5, 9.99]),
                               rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("schedule, target", [("rectified_flow", "velocity"), ("vp_linear", "epsilon")])
def test_consistency_student_in_one_step_matches_the_teacher_chain(schedule, target):
    objective = Objective(get_schedule(schedule), get_target(target))
    teacher, num_intervals = TOY.model_fn(objective), 4
    student = AffineStudent(TOY.dim)
    student_fn = lambda x_t, t: student(x_t, t)  # noqa: E731
    generator = torch.Generator().manual_seed(0)

    def batch_loss():
        x = TOY.sample(256, generator)
        # target network theta^- = the student itself without gradient (Song & Dhariwal 2023)
        return consistency_distillation_loss(student_fn, student_fn, teacher, objective, x, num_intervals,
                                             generator=generator).mean()

    fit(student, batch_loss, steps=1500, lr=0.05)
    noise = torch.randn(4000, TOY.dim, generator=generator, dtype=DTYPE)
    chain, _ = ddim(teacher, objective, noise, num_intervals)
    teacher_one_step, _ = ddim(teacher, objective, noise, 1)
    one_step, nfe = consistency_sample(student_fn, objective, noise, 1)
    student_error = (one_step - chain).square().mean().item()
    teacher_error = (teacher_one_step - chain).square().mean().item()

    # two steps: re-noise f(noise, 1) at t = 0.5 with fresh eps, then f again, which should be the teacher's
    # DDIM chain 0.5 -> 0.25 -> 0 from there (the same eps, from a generator with the same seed)
    two_steps, two_nfe = consistency_sample(student_fn, objective, noise, 2, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    expected = objective.interpolate(chain, eps, 0.5)
    for t, s in ((0.5, 0.25), (0.25, 0.0)):
        expected = ddim_step(teacher, objective, expected, t, s)
    two_step_error = (two_steps - expected).square().mean().item()
    print(f"{schedule}-{target}: MSE to the teacher's {num_intervals}-step DDIM chain: 1-step student "
          f"{student_error:.2e}, 1-step teacher {teacher_error:.2e}; 2-step student to re-noised chain "
          f"{two_step_error:.2e}")
    assert (nfe, two_nfe) == (1, 2)
    assert student_error < 0.01 * teacher_error
    assert two_step_error < 0.01 * teacher_error
