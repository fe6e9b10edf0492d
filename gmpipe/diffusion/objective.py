"""The generalized diffusion objective: schedule (a, b) x target (c, d) x time density p(t) x weighting w(t).

Everything rests on one linear system per time t (shapes: x, z, x_t, y are (B, ...), t is (B,)):

    [[a, b],     [x,     [x_t,
     [c, d]]  @   z]  =   y  ]        x_t = a x + b z (the path),  y = c x + d z (the target).

Solving it turns a network prediction y_hat into a data and noise estimate (x_hat, z_hat), from which any
other parameterization and the probability-flow velocity a' x_hat + b' z_hat follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gmpipe.diffusion.noise import standard_normal
from gmpipe.diffusion.schedules import Schedule
from gmpipe.diffusion.targets import MIN_DETERMINANT, Target, Velocity, guard_determinant
from gmpipe.diffusion.time_density import TimeDensity, UniformTime, get_time_density
from gmpipe.diffusion.times import as_time, expand_like
from gmpipe.diffusion.weightings import UniformWeighting, Weighting
from gmpipe.registry import SCHEDULES, TARGETS, WEIGHTINGS

ModelFn = Callable[..., Tensor]  # model_fn(x_t (B, ...), t (B,), **conditioning) -> prediction (B, ...)


def solve_data_and_noise(
    a: Tensor, b: Tensor, c: Tensor, d: Tensor, x_t: Tensor, y: Tensor, eps: float = MIN_DETERMINANT
) -> tuple[Tensor, Tensor]:
    """Invert [[a, b], [c, d]] [x, z]^T = [x_t, y]^T by Cramer's rule:
    x = (d x_t - b y) / det, z = (a y - c x_t) / det, det = a d - b c.

    Where the system is singular, |det| is clamped at eps with its sign kept: the result stays finite, and
    the component the equations do not determine comes out near 0 (e.g. x_hat from epsilon at a = 0).
    Coefficients broadcast against x_t and y.
    """
    det = guard_determinant(a * d - b * c, eps)
    return (d * x_t - b * y) / det, (a * y - c * x_t) / det


@dataclass(frozen=True)
class Objective:
    """A training objective and the prediction conversions samplers need, in one value object.

    `to_config()` / `Objective.from_config()` write and rebuild it, so a trained model can be stored with
    the objective it was trained with.
    """

    schedule: Schedule
    target: Target
    time_density: TimeDensity = field(default_factory=UniformTime)
    weighting: Weighting = field(default_factory=UniformWeighting)

    def _path(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return expand_like(self.schedule.a(t), like), expand_like(self.schedule.b(t), like)

    def _target_coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        c, d = self.target.coefficients(self.schedule, t)
        return expand_like(c, like), expand_like(d, like)

    def interpolate(self, x: Tensor, z: Tensor, t: float | Tensor) -> Tensor:
        """x_t = a(t) x + b(t) z. x, z: (B, ...); t: float or (B,). Returns (B, ...)."""
        t = as_time(t, x)
        a, b = self._path(t, x)
        return a * x + b * z

    def target_value(self, x: Tensor, z: Tensor, t: float | Tensor) -> Tensor:
        """y = c(t) x + d(t) z, what the network should output at x_t. Returns (B, ...)."""
        t = as_time(t, x)
        c, d = self._target_coefficients(t, x)
        return c * x + d * z

    def to_data_and_noise(self, pred: Tensor, x_t: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """(x_hat, z_hat) from a prediction in this objective's target, via `solve_data_and_noise`."""
        t = as_time(t, x_t)
        a, b = self._path(t, x_t)
        c, d = self._target_coefficients(t, x_t)
        return solve_data_and_noise(a, b, c, d, x_t, pred)

    def from_data_and_noise(self, x_hat: Tensor, z_hat: Tensor, t: float | Tensor) -> Tensor:
        """The prediction c(t) x_hat + d(t) z_hat in this objective's target. Returns (B, ...)."""
        return self.target_value(x_hat, z_hat, t)

    def velocity(self, pred: Tensor, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Probability-flow velocity dx_t/dt = a'(t) x_hat + b'(t) z_hat for ODE samplers. Returns (B, ...).

        A velocity-target prediction is returned as is (no round trip through the 2x2 system).
        """
        if isinstance(self.target, Velocity):
            return pred
        t = as_time(t, x_t)
        x_hat, z_hat = self.to_data_and_noise(pred, x_t, t)
        da = expand_like(self.schedule.da(t), x_t)
        db = expand_like(self.schedule.db(t), x_t)
        return da * x_hat + db * z_hat

    def loss(
        self,
        model_fn: ModelFn,
        x: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Per-sample weighted MSE w(t) * mean((model_fn(x_t, t, **model_kwargs) - y)^2). Returns (B,).

        t (B,) is drawn from the time density and then z ~ N(0, I) like x, both with `generator`, unless
        given. model_kwargs (e.g. class labels) are passed to model_fn unchanged. Reduce with .mean().
        """
        if t is None:
            t = self.time_density.sample(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        t = as_time(t, x)
        z = noise
        if z is None:
            z = standard_normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
        x_t = self.interpolate(x, z, t)
        prediction = model_fn(x_t, t, **model_kwargs)
        squared_error = (prediction - self.target_value(x, z, t)).square()
        return self.weighting.weight(self.schedule, self.target, t) * squared_error.flatten(1).mean(1)

    def to_config(self) -> dict[str, dict[str, Any]]:
        """{"schedule": {...}, "target": {...}, "time_density": {...}, "weighting": {...}}."""
        return {
            "schedule": self.schedule.to_config(),
            "target": self.target.to_config(),
            "time_density": self.time_density.to_config(),
            "weighting": self.weighting.to_config(),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, str | Mapping[str, Any]]) -> Objective:
        """Build from names or {"name": ..., **params} dicts; time_density and weighting default to uniform.

        Example: {"schedule": "rectified_flow", "target": "velocity",
                  "time_density": {"name": "logit_normal", "mean": 0.0, "std": 1.0, "shift": 3.0}}.
        """
        unknown = set(config) - {"schedule", "target", "time_density", "weighting"}
        if unknown:
            raise ValueError(f"unknown objective keys {sorted(unknown)}")
        for required in ("schedule", "target"):
            if required not in config:
                raise ValueError(f"objective config needs a {required!r} key")
        density = config.get("time_density", "uniform")
        if isinstance(density, str):
            density = {"name": density}
        if "name" not in density:
            raise ValueError(f"a time density config needs a 'name' key, got {sorted(density)}")
        return cls(
            schedule=SCHEDULES.from_config(config["schedule"]),
            target=TARGETS.from_config(config["target"]),
            time_density=get_time_density(**density),
            weighting=WEIGHTINGS.from_config(config.get("weighting", "uniform")),
        )
