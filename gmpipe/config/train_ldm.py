"""``train_ldm:`` the latent denoiser, the generalized objective it is trained on, and how it samples."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gmpipe.config.base import Fraction
from gmpipe.config.loop import LoopConfig

Sampler = Literal["euler", "heun", "ddim", "ddpm"]


class ObjectiveConfig(LoopConfig):
    """The generalized objective: schedule (a, b) x target (c, d) x time density p(t) x weighting w(t)."""

    schedule: Literal["rectified_flow", "vp_linear", "vp_cosine", "trigonometric"] = "rectified_flow"
    target: Literal["velocity", "epsilon", "v_prediction", "data"] = "velocity"
    time_density: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: Annotated[float, Field(gt=0.0)] = 1.0
    time_shift: Annotated[float, Field(gt=0.0)] = 1.0
    weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: Annotated[float, Field(gt=0.0)] = 5.0

    def objective_config(self) -> dict:
        density = {"name": self.time_density, "shift": self.time_shift}
        if self.time_density == "logit_normal":
            density.update(mean=self.logit_mean, std=self.logit_std)
        weighting = {"name": self.weighting}
        if self.weighting == "min_snr":
            weighting["gamma"] = self.min_snr_gamma
        return {"schedule": self.schedule, "target": self.target, "time_density": density, "weighting": weighting}


class TrainLDMConfig(ObjectiveConfig):
    """Denoiser ``preset`` sizes are in ``gmpipe.nn.denoiser.DENOISER_PRESETS``; ``p_uncond`` is the condition
    dropout that makes classifier-free guidance possible; the ``sample_*`` keys are the defaults stored with the
    model (and used for its sample grid)."""

    conditioning: Literal["none", "class", "text"] = "class"
    preset: Literal["tiny", "small", "base"] = "small"
    p_uncond: Fraction = 0.1
    sampler: Sampler = "euler"
    sample_steps: Annotated[int, Field(ge=1, le=1000)] = 50
    guidance: Annotated[float, Field(ge=0.0, le=50.0)] = 1.0
    grid_per_class: Annotated[int, Field(ge=1, le=64)] = 8
