"""Reflow (Liu et al. 2022, "Flow Straight and Fast", sec. 2.2-2.3): straighten a teacher's ODE by
training a rectified flow on the teacher's own (noise, sample) couplings.

1. Couplings: draw noise z from a seeded generator and map each z through the teacher's deterministic
   probability-flow ODE to a sample x (`make_couplings`, `teacher_sample_fn`). The pairs (z, x) are a
   deterministic coupling, reproducible from the seed.
2. Reflow: train the student's velocity on the straight path between each pair (`reflow_loss`):
   x_t = (1 - t) x + t z, target dx_t/dt = z - x. The student's flow has the same marginals as the
   teacher's pushforward and straighter paths, so Euler with 1-2 steps samples it well.

The student is always a rectified-flow velocity model, whatever the teacher's schedule and target: save it
with `reflow_objective()` (rectified_flow + velocity) next to its weights, not with the teacher's objective,
and sample it with `euler(student_fn, reflow_objective(), noise, 1 or 2)`. Liu et al. write time the other
way (X_0 noise, X_1 data); here t = 0 is data and t = 1 noise, as everywhere in gmpipe.

Shapes: z, x (N or B, ...) with the batch first; t (B,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gmpipe.batching import take_rows, to_device
from gmpipe.diffusion.guidance import DenoiserFn
from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.samplers import get_sampler
from gmpipe.diffusion.schedules import RectifiedFlow
from gmpipe.diffusion.targets import Velocity
from gmpipe.diffusion.time_density import TimeDensity, UniformTime
from gmpipe.distill.teacher import NullCondition, guided_teacher_fn

ModelFn = Callable[[Tensor, Tensor], Tensor]  # model_fn(x_t (B, ...), t (B,)) -> prediction (B, ...)
SampleFn = Callable[[Tensor, Any], Tensor]  # sample_fn(z (B, ...), cond for these rows or None) -> x (B, ...)

DETERMINISTIC_SAMPLERS = ("euler", "heun", "ddim")  # a coupling must be a function of z: no ancestral noise


def reflow_objective(time_density: TimeDensity | None = None) -> Objective:
    """The student's objective: rectified-flow path a = 1 - t, b = t, velocity target z - x, uniform
    weighting; t ~ U[0, 1] as in Liu et al. 2022 unless another density is given. Save it with the student."""
    return Objective(RectifiedFlow(), Velocity(), time_density or UniformTime())


def coupling_noise(
    num_pairs: int, shape: tuple[int, ...], *, seed: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(num_pairs, *shape) standard normal noise from a CPU generator seeded with `seed`: the same seed gives
    the same noise on any machine and device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_pairs, *shape), generator=generator, dtype=dtype)


@dataclass(frozen=True)
class Couplings:
    """Teacher couplings: noise (N, ...) and the teacher's ODE samples data (N, ...) from it, on the CPU;
    cond: the per-pair conditions (batch first: tensor, tuple/list/dict of tensors) or None; seed: the
    seed the noise was drawn with."""

    noise: Tensor
    data: Tensor
    cond: Any
    seed: int

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batch(self, index: Tensor | slice) -> tuple[Tensor, Tensor, Any]:
        """(z, x, cond) of the rows `index` ((B,) long tensor or a slice)."""
        return self.noise[index], self.data[index], take_rows(self.cond, index)


@torch.no_grad()
def make_couplings(
    sample_fn: SampleFn,
    num_pairs: int,
    shape: tuple[int, ...],
    *,
    seed: int,
    cond: Any = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Couplings:
    """Couplings (z, x = sample_fn(z, cond)) for num_pairs noises of `shape` drawn by `coupling_noise(seed)`.

    sample_fn(z (b, *shape) on `device`, the matching rows of cond) -> x (b, *shape) must be deterministic
    (see `teacher_sample_fn`), so the couplings are a function of the seed and the teacher. cond: per-pair
    conditions with num_pairs rows, or None. Runs in batches of batch_size under no_grad; results on the CPU.
    """
    noise = coupling_noise(num_pairs, shape, seed=seed, dtype=dtype)
    samples = []
    for start in range(0, num_pairs, batch_size):
        rows = slice(start, min(start + batch_size, num_pairs))
        z = noise[rows].to(device) if device is not None else noise[rows]
        samples.append(sample_fn(z, to_device(take_rows(cond, rows), device)).to("cpu", dtype))
    return Couplings(noise=noise, data=torch.cat(samples), cond=cond, seed=seed)


def teacher_sample_fn(
    denoiser_fn: DenoiserFn,
    objective: Objective,
    num_steps: int,
    *,
    sampler: str = "heun",
    w: float = 0.0,
    null_condition: NullCondition | None = None,
    shift: float = 1.0,
) -> SampleFn:
    """sample_fn(z, cond) -> x: the teacher's deterministic ODE sample from z, guided at w.

    denoiser_fn(x_t, t, cond) -> prediction in objective.target (e.g. `lambda x, t, c: teacher(x, t, c)`);
    sampler: "euler", "heun" or "ddim" (deterministic, so that x is a function of z); null_condition
    (batch_size, cond) -> unconditional cond, needed when w != 0 (e.g. `lambda n, c: teacher.null_condition(n,
    like=c)`). Guidance follows gmpipe.diffusion.guidance: (1 + w) pred_cond - w pred_uncond.
    """
    if sampler not in DETERMINISTIC_SAMPLERS:
        raise ValueError(f"couplings need a deterministic sampler, one of {DETERMINISTIC_SAMPLERS}, got {sampler!r}")
    if w != 0 and null_condition is None:
        raise ValueError("a guided teacher (w != 0) needs null_condition")
    solve = get_sampler(sampler)

    def sample(z: Tensor, cond: Any) -> Tensor:
        model_fn = guided_teacher_fn(denoiser_fn, cond, z.shape[0], w, null_condition)
        x, _ = solve(model_fn, objective, z, num_steps, shift=shift)
        return x

    return sample


def reflow_loss(
    student_fn: ModelFn,
    z: Tensor,
    x: Tensor,
    *,
    generator: torch.Generator | None = None,
    time_density: TimeDensity | None = None,
) -> Tensor:
    """Per-sample reflow loss, Liu et al. 2022, eq. 1 on the teacher's coupling (z, x). Returns (B,).

    t ~ time_density (uniform by default) with `generator`, x_t = (1 - t) x + t z, and the loss is
    mean((student_fn(x_t, t) - (z - x))^2). student_fn(x_t (B, ...), t (B,)) -> velocity (B, ...), condition
    bound by the caller (the coupling's cond, no guidance: it is folded into the couplings when the teacher
    was guided). z, x: (B, ...) rows of `Couplings`. Reduce with .mean().
    """
    return reflow_objective(time_density).loss(student_fn, x, noise=z, generator=generator)
