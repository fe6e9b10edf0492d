"""gmpipe's sampling as a diffusers scheduler: ``scheduler/scheduler_config.json`` of a pipeline folder.

The config holds what a diffusers user needs to sample the model and cannot find anywhere else in diffusers'
vocabulary, in gmpipe's own words:

    objective        the generalized objective (schedule a, b; target c, d; time density; weighting), as
                     ``objective.json`` writes it; t = 0 data, t = 1 noise (``gmpipe.diffusion``)
    latent_shift,    the per-channel latent statistics of ``latent_stats.json``: the denoiser works on
    latent_scale     (z - shift) * scale, and the autoencoder decodes z = latents / scale + shift
    sampler          a ``gmpipe.registry.SAMPLERS`` name (euler, heun, ..., dpmpp_2m, unipc, flow_euler)
    num_inference_steps, shift
                     the model's default step count and the resolution shift of its time grid
    timestep_scale   the denoiser sees the diffusers timestep t * 1000 (``gmpipe.nn.denoiser``)

It is a class of gmpipe's own rather than a diffusers scheduler with extra fields because diffusers drops config
fields its classes do not declare, and because gmpipe's samplers (any schedule x target, per-sample noise streams)
are not diffusers' discrete-time schedulers. Another sampler or step count for a loaded pipeline, the diffusers way:
``pipe.scheduler = LatentDiffusionScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m")``.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config

from gmpipe.data.latents import LatentStats
from gmpipe.diffusion import Objective
from gmpipe.diffusion.samplers import time_grid
from gmpipe.nn.denoiser import DIFFUSERS_TIMESTEPS
from gmpipe.registry import SAMPLERS


class LatentDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """The sampling side of a gmpipe latent diffusion model (see the module docstring for the config)."""

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0  # sampling starts from x_1 ~ N(0, I)

    @register_to_config
    def __init__(self, objective: dict | None = None, latent_shift: list[float] | None = None,
                 latent_scale: list[float] | None = None, sampler: str = "euler", num_inference_steps: int = 50,
                 shift: float = 1.0, timestep_scale: int = DIFFUSERS_TIMESTEPS) -> None:
        if objective is None or latent_shift is None or latent_scale is None:
            raise ValueError("a LatentDiffusionScheduler needs objective, latent_shift and latent_scale")
        SAMPLERS.lookup(sampler)
        self.objective = Objective.from_config(objective)
        self.latent_stats = LatentStats(tuple(latent_shift), tuple(latent_scale))
        self.timesteps = None

    @classmethod
    def of(cls, objective: Objective, stats: LatentStats, settings: dict) -> LatentDiffusionScheduler:
        """The scheduler of a model with this objective, these latent statistics and sampling ``settings``
        (``sampling.json``: sampler, steps, shift)."""
        return cls(objective=objective.to_config(), latent_shift=list(stats.shift), latent_scale=list(stats.scale),
                   sampler=settings["sampler"], num_inference_steps=settings["steps"], shift=settings["shift"])

    @property
    def sampling_settings(self) -> dict:
        """sampler, steps and shift, as ``sampling.json`` names them."""
        return {"sampler": self.config.sampler, "steps": self.config.num_inference_steps, "shift": self.config.shift}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``timesteps``: the diffusers timesteps t * 1000 of the grid's num_inference_steps start times, from 1000
        down (the times a one-evaluation-per-step sampler runs the denoiser at)."""
        grid = time_grid(num_inference_steps, shift=self.config.shift, device=device)
        self.timesteps = grid[:-1] * self.config.timestep_scale
