"""The loop adapters: each method's loss(batch, step, context, modules) with a real (tiny) Denoiser pair,
and one progressive round through the shared training loop on the class-conditional toy."""

from __future__ import annotations

import copy

import pytest
import torch

from gmpipe.config.loop import LoopConfig
from gmpipe.diffusion import Objective, get_schedule, get_target, make_guided_model_fn
from gmpipe.diffusion.samplers import ddim
from gmpipe.distill.loop_losses import consistency_loss_fn, guidance_loss_fn, progressive_loss_fn, reflow_loss_fn
from gmpipe.distill.reflow import make_couplings, reflow_objective, teacher_sample_fn
from gmpipe.registry import DISTILL_METHODS
from gmpipe.train.loop import LossStep, train
from tests.distill.toys import DTYPE, ClassConditionalGaussians, MLPStudent

OBJECTIVE = Objective(get_schedule("rectified_flow"), get_target("velocity"))


@pytest.fixture(scope="module")
def denoisers():
    from gmpipe.nn.denoiser import LabelDenoiser

    torch.manual_seed(0)
    teacher = LabelDenoiser(in_channels=4, sample_size=8, preset="tiny", num_classes=3).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)  # a student starts from its teacher's weights
    return teacher, student


def null_condition_of(teacher):
    return lambda n, cond: teacher.null_condition(n, like=cond)


def test_every_adapter_trains_the_student_only(denoisers):
    teacher, student = denoisers
    x, labels = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 0])
    null = null_condition_of(teacher)
    couplings = make_couplings(teacher_sample_fn(teacher, OBJECTIVE, 2, sampler="euler", w=1.5, null_condition=null),
                               4, (4, 8, 8), seed=0, cond=labels)
    cases = {
        "progressive": (progressive_loss_fn(teacher, OBJECTIVE, 2, w=1.5, null_condition=null), (x, labels)),
        "guidance": (guidance_loss_fn(teacher, OBJECTIVE, w=1.5, null_condition=null), (x, labels)),
        "consistency": (consistency_loss_fn(teacher, OBJECTIVE, 4, w=1.5, null_condition=null), (x, labels)),
        "reflow": (reflow_loss_fn(), couplings.batch(slice(0, 4))),
    }
    assert set(cases) == set(DISTILL_METHODS)
    for name, (loss_fn, batch) in cases.items():
        student.zero_grad()
        value, terms = loss_fn(batch, 0, {}, {"student": student})
        value.backward()
        assert value.ndim == 0 and torch.isfinite(value), name
        assert torch.equal(terms["loss"], value.detach()) and not terms["loss"].requires_grad, name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), name
        assert all(p.grad is None for p in teacher.parameters()), name
    with pytest.raises(ValueError, match="null_condition"):
        progressive_loss_fn(teacher, OBJECTIVE, 2, w=1.5)((x, labels), 0, {}, {"student": student})


def test_registry():
    """Every registered method is a DistillMethod whose keys are distill params, and registered under its name."""
    from gmpipe.config.distill import DistillConfig
    from gmpipe.distill.session import DistillMethod

    for name in DISTILL_METHODS:
        method = DISTILL_METHODS[name]()
        assert isinstance(method, DistillMethod) and method.name == name and method.paper
        assert set(method.keys + method.sampling_keys) <= set(DistillConfig.model_fields)
    with pytest.raises(ValueError, match="unknown distillation method"):
        DISTILL_METHODS.lookup("magic")
    assert reflow_objective().to_config()["target"] == {"name": "velocity"}


def test_progressive_round_through_the_shared_loop(tmp_path):
    toy = ClassConditionalGaussians(means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], std=0.5)
    data, cond = toy.sample(1024, torch.Generator().manual_seed(0))
    null_condition = lambda n, c: toy.null_cond.expand(n, -1)  # noqa: E731
    student = MLPStudent(2, cond_dim=3)
    loss_fn = progressive_loss_fn(toy.denoiser_fn(OBJECTIVE), OBJECTIVE, 1, w=2.0, null_condition=null_condition)
    config = LoopConfig(steps=300, batch_size=128, lr=1e-2, log_every=50, checkpoint_every=300, clip_grad_norm=None,
                        lr_schedule="cosine")
    result = train(config, [LossStep("student", student, loss_fn)], len(data),
                   lambda index, device: (data[index].to(device), cond[index].to(device)),
                   tmp_path / "ckpt", ema_of=None)
    losses = [row["student/loss"] for row in result.history]
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    guided = make_guided_model_fn(toy.denoiser_fn(OBJECTIVE), cond[:1000], toy.null_cond, 2.0)
    teacher_samples, _ = ddim(guided, OBJECTIVE, noise, 2)
    student_samples, _ = ddim(lambda x_t, t: student(x_t, t, cond[:1000]), OBJECTIVE, noise, 1)
    error = (student_samples - teacher_samples).square().mean().item()
    print(f"loop losses {losses[0]:.3f} -> {losses[-1]:.4f}; "
          f"1-step student MSE to the guided 2-step teacher {error:.4f}")
    assert losses[-1] < 0.05 * losses[0]
    assert error < 0.05
