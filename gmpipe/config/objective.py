"""The generalized objective's keys: schedule (a, b) x target (c, d) x time density p(t) x weighting w(t), each a
name from its registry (``gmpipe.registry``), plus the parameters of the density and the weighting."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gmpipe.config.base import Section, one_of
from gmpipe.registry import SCHEDULES, TARGETS, TIME_DENSITIES, WEIGHTINGS


class ObjectiveConfig(Section):
    """``logit_mean``/``logit_std`` parameterize the logit-normal density, ``min_snr_gamma`` the min-SNR weighting;
    ``time_shift`` is the resolution shift of the training times and of the model's sampling grid."""

    schedule: one_of(SCHEDULES) = "rectified_flow"
    target: one_of(TARGETS) = "velocity"
    time_density: one_of(TIME_DENSITIES) = "logit_normal"
    logit_mean: float = 0.0
    logit_std: Annotated[float, Field(gt=0.0)] = 1.0
    time_shift: Annotated[float, Field(gt=0.0)] = 1.0
    weighting: one_of(WEIGHTINGS) = "uniform"
    min_snr_gamma: Annotated[float, Field(gt=0.0)] = 5.0

    def objective_config(self) -> dict:
        """The ``Objective.from_config`` dict of these keys (as ``objective.json`` stores it)."""
        density = {"name": self.time_density, "shift": self.time_shift}
        if self.time_density == "logit_normal":
            density.update(mean=self.logit_mean, std=self.logit_std)
        weighting = {"name": self.weighting}
        if self.weighting == "min_snr":
            weighting["gamma"] = self.min_snr_gamma
        return {"schedule": self.schedule, "target": self.target, "time_density": density, "weighting": weighting}
