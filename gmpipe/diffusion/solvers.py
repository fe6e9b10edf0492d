"""Training-free few-step solvers from diffusers as gmpipe samplers: DPM-Solver++ (2M), UniPC and flow-matching
Euler, on any gmpipe objective, with the signature of every sampler (``gmpipe.diffusion.samplers``):

    sampler(model_fn, objective, noise, num_steps, *, shift=1.0, generator=None) -> (x0, nfe)

The mapping (one for every schedule and target). diffusers' solvers in their flow-matching form work on a state
y = (1 - s) x + s z with a "sigma" s in [0, 1]. Any gmpipe path x_t = a(t) x + b(t) z is that state up to a scale:

    x_t = (a + b) y,   s(t) = b(t) / (a(t) + b(t)),   alpha_s = 1 - s = a / (a + b),

so the solver sees the same signal-to-noise ratio a / b, and so the same log-SNR lambda = log(a / b) that
DPM-Solver++ and UniPC step in, as gmpipe's own path (for rectified flow s = t and the scale is 1). At each grid
time t_k (``time_grid``: uniform in t, then the resolution shift) the model runs at t_k on x_t = (a + b) y; its
prediction, in whatever target the objective has, goes through the 2x2 solve (``Objective.to_data_and_noise``) to
(x_hat, z_hat), and the solver gets the data prediction x_hat (``prediction_type="sample"``; the multistep solvers'
own data-prediction form) or, for flow-matching Euler, the flow velocity dy/ds = z_hat - x_hat.

The grid ends at s = 0 (t = 0), where each solver takes its last step on the data prediction alone. NFE =
num_steps (x nfe_per_call) for all three; they are deterministic (``generator`` is unused). The schedulers work
in float32 internally, whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor

from gmpipe.diffusion.objective import Objective
from gmpipe.diffusion.samplers import CallCounter, ModelFn, time_grid
from gmpipe.diffusion.times import as_time

DIFFUSERS_TIMESTEPS = 1000  # diffusers' timestep = s * 1000 in its flow-matching form (only recorded, never read)

# (x_hat, z_hat) -> what the solver is handed: the data prediction, or the flow velocity dy/ds = z - x
DataPrediction = Callable[[Tensor, Tensor], Tensor]


def flow_sigmas(objective: Objective, times: Tensor) -> tuple[Tensor, Tensor]:
    """(s, scale) at the grid times (N + 1,): s = b / (a + b) and scale = a + b, with x_t = scale * y."""
    a, b = objective.schedule.a(times), objective.schedule.b(times)
    return b / (a + b), a + b


def solve(model_fn: ModelFn, objective: Objective, noise: Tensor, num_steps: int, shift: float,
          scheduler, handed: DataPrediction) -> tuple[Tensor, int]:
    """Run a diffusers multistep ``scheduler`` (already given the grid's sigmas) from t = 1 to 0 on gmpipe's
    objective (module docstring); ``handed`` turns (x_hat, z_hat) into the scheduler's model output."""
    model = CallCounter(model_fn)
    times = time_grid(num_steps, shift=shift, device=noise.device, dtype=noise.dtype)
    _, scale = flow_sigmas(objective, times)
    scheduler.set_begin_index(0)
    y = noise / scale[0]
    for k in range(num_steps):
        x_t = y * scale[k]
        t = as_time(times[k], x_t)
        x_hat, z_hat = objective.to_data_and_noise(model(x_t, t), x_t, t)
        y = scheduler.step(handed(x_hat, z_hat), scheduler.timesteps[k], y).prev_sample
    return y * scale[-1], model.nfe


def _grid_sigmas(objective: Objective, num_steps: int, shift: float) -> Tensor:
    """The flow sigmas s_k of the first num_steps grid times (the scheduler appends s = 0), float64 on the CPU."""
    sigmas, _ = flow_sigmas(objective, time_grid(num_steps, shift=shift, dtype=torch.float64))
    return sigmas[:-1]


@torch.no_grad()
def dpmpp_2m(model_fn: ModelFn, objective: Objective, noise: Tensor, num_steps: int, *, shift: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: second-order multistep in the data prediction), diffusers'
    ``DPMSolverMultistepScheduler``, on gmpipe's grid; first order at the first and last step. NFE = num_steps."""
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="sample", use_flow_sigmas=True,
        final_sigmas_type="zero", lower_order_final=True,
    )
    scheduler.set_timesteps(num_steps)
    # this scheduler takes no custom sigmas: its grid is replaced by gmpipe's (same length, s = 0 appended)
    sigmas = _grid_sigmas(objective, num_steps, shift)
    scheduler.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    scheduler.timesteps = sigmas.float() * DIFFUSERS_TIMESTEPS
    return solve(model_fn, objective, noise, num_steps, shift, scheduler, lambda x_hat, z_hat: x_hat)


@torch.no_grad()
def unipc(model_fn: ModelFn, objective: Objective, noise: Tensor, num_steps: int, *, shift: float = 1.0,
          generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """UniPC (Zhao et al. 2023: the UniP-2 predictor with the UniC corrector, B(h) = e^h - 1, in the data
    prediction), diffusers' ``UniPCMultistepScheduler``, on gmpipe's grid. The corrector reuses the next step's
    model evaluation, so NFE = num_steps. (diffusers moves s = 1 down by 1e-6 to keep log(alpha) finite.)"""
    scheduler = UniPCMultistepScheduler(
        solver_order=2, prediction_type="sample", predict_x0=True, solver_type="bh2", use_flow_sigmas=True,
        flow_shift=1.0, final_sigmas_type="zero", lower_order_final=True,
    )
    scheduler.set_timesteps(sigmas=_grid_sigmas(objective, num_steps, shift).numpy())
    return solve(model_fn, objective, noise, num_steps, shift, scheduler, lambda x_hat, z_hat: x_hat)


@torch.no_grad()
def flow_euler(model_fn: ModelFn, objective: Objective, noise: Tensor, num_steps: int, *, shift: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """Euler on the flow-matching ODE dy/ds = z_hat - x_hat in (s, y) (diffusers' ``FlowMatchEulerDiscreteScheduler``,
    as used for SD3): gmpipe's ``euler`` for rectified flow, another first-order discretization for the other
    schedules. NFE = num_steps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=_grid_sigmas(objective, num_steps, shift).numpy())
    return solve(model_fn, objective, noise, num_steps, shift, scheduler, lambda x_hat, z_hat: z_hat - x_hat)
