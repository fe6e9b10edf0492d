"""Reflow on a bimodal toy with an exact teacher: reproducible couplings, a straight 1-step student."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import Objective, get_schedule, get_target
from gmpipe.diffusion.samplers import euler
from gmpipe.distill.reflow import (
    coupling_noise,
    make_couplings,
    reflow_loss,
    reflow_objective,
    teacher_sample_fn,
)
from tests.distill.toys import DTYPE, ClassConditionalGaussians, GaussianMixture, MLPStudent, fit

# 1-D, two unequal modes: mean 0.8, std 1.9; the teacher's ODE from noise to data is curved
BIMODAL = GaussianMixture(means=[[-2.0], [2.0]], stds=[[0.5], [0.5]], weights=[0.3, 0.7])


def exact_teacher(objective: Objective):
    """The exact mixture model as a denoiser_fn(x_t, t, cond) that ignores cond."""
    model_fn = BIMODAL.model_fn(objective)
    return lambda x_t, t, cond: model_fn(x_t, t)


def wasserstein_1d(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """W1 between two equally sized 1-D samples: mean |sorted difference|."""
    return (samples.flatten().sort().values - reference.flatten().sort().values).abs().mean().item()


def test_couplings_are_reproducible_from_the_seed():
    objective = Objective(get_schedule("rectified_flow"), get_target("velocity"))
    sample_fn = teacher_sample_fn(exact_teacher(objective), objective, 8, sampler="euler")
    first = make_couplings(sample_fn, 100, (1,), seed=7, dtype=DTYPE, batch_size=32)
    again = make_couplings(sample_fn, 100, (1,), seed=7, dtype=DTYPE, batch_size=100)
    other = make_couplings(sample_fn, 100, (1,), seed=8, dtype=DTYPE)
    assert len(first) == 100 and first.seed == 7
    assert torch.equal(first.noise, again.noise) and torch.equal(first.data, again.data)  # batching does not matter
    assert torch.equal(first.noise, coupling_noise(100, (1,), seed=7, dtype=DTYPE))
    assert not torch.allclose(first.noise, other.noise) and not torch.allclose(first.data, other.data)
    # each pair is the teacher's ODE sample from its own noise
    torch.testing.assert_close(first.data[:5], sample_fn(first.noise[:5], None))


def test_couplings_carry_their_conditions_and_a_guided_teacher_needs_a_null_condition():
    toy = ClassConditionalGaussians(means=[[-2.0, 0.0], [2.0, 0.0]], std=0.5)
    objective = Objective(get_schedule("rectified_flow"), get_target("velocity"))
    _, cond = toy.sample(10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="null_condition"):
        teacher_sample_fn(toy.denoiser_fn(objective), objective, 4, w=1.0)
    with pytest.raises(ValueError, match="deterministic"):
        teacher_sample_fn(toy.denoiser_fn(objective), objective, 4, sampler="ddpm")
    sample_fn = teacher_sample_fn(
        toy.denoiser_fn(objective), objective, 4, w=1.0, null_condition=lambda n, c: toy.null_cond.expand(n, -1)
    )
    couplings = make_couplings(sample_fn, 10, (2,), seed=0, cond=cond, dtype=DTYPE, batch_size=3)
    z, x, batch_cond = couplings.batch(torch.tensor([1, 4]))
    torch.testing.assert_close(x, sample_fn(z, cond[[1, 4]]))
    assert torch.equal(batch_cond, cond[[1, 4]])


@pytest.mark.parametrize("schedule, target", [("rectified_flow", "velocity"), ("vp_linear", "epsilon")])
def test_reflow_student_samples_in_one_euler_step(schedule, target):
    teacher_objective = Objective(get_schedule(schedule), get_target(target))
    sample_fn = teacher_sample_fn(exact_teacher(teacher_objective), teacher_objective, 32, sampler="heun")
    couplings = make_couplings(sample_fn, 4000, (1,), seed=0, dtype=DTYPE)
    student = MLPStudent(1)
    generator = torch.Generator().manual_seed(0)

    def batch_loss():
        index = torch.randint(len(couplings), (256,), generator=generator)
        z, x, _ = couplings.batch(index)
        return reflow_loss(lambda x_t, t: student(x_t, t), z, x, generator=generator).mean()

    fit(student, batch_loss, steps=3000, lr=2e-2)

    noise = torch.randn(4000, 1, generator=generator, dtype=DTYPE)
    data = BIMODAL.sample(4000, generator)
    student_one_step, nfe = euler(lambda x_t, t: student(x_t, t), reflow_objective(), noise, 1)
    teacher_one_step, _ = euler(BIMODAL.model_fn(teacher_objective), teacher_objective, noise, 1)
    teacher_ode = sample_fn(noise, None)  # where the student's straight paths should lead
    mean, std = student_one_step.mean().item(), student_one_step.std().item()
    student_w1, teacher_w1 = wasserstein_1d(student_one_step, data), wasserstein_1d(teacher_one_step, data)
    distance_to_ode = (student_one_step - teacher_ode).abs().mean().item()
    print(f"{schedule}-{target} teacher: data mean {BIMODAL.mean.item():.3f} std {BIMODAL.std.item():.3f}; "
          f"1-step student mean {mean:.3f} std {std:.3f} W1 {student_w1:.3f} |x - ODE(z)| {distance_to_ode:.3f}; "
          f"1-step teacher mean {teacher_one_step.mean():.3f} std {teacher_one_step.std():.3f} W1 {teacher_w1:.3f}; "
          f"teacher ODE W1 {wasserstein_1d(teacher_ode, data):.3f}")
    assert nfe == 1
    # 4000 samples: standard errors 0.03 (mean) and 0.02 (std), and W1 between two samples of the data is
    # about 0.05; the rest is the student's fit of the jump between the modes at t = 1
    assert abs(mean - BIMODAL.mean.item()) < 0.1
    assert abs(std / BIMODAL.std.item() - 1) < 0.05
    assert distance_to_ode < 0.15
    assert student_w1 < 0.15 and student_w1 < teacher_w1 / 5
