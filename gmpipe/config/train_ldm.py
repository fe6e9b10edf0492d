"""``train_ldm:`` the latent denoiser, the generalized objective it is trained on, the loop, and how it samples."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gmpipe.config.base import ComposedSection, Fraction, one_of
from gmpipe.config.loop import LoopConfig
from gmpipe.config.objective import ObjectiveConfig
from gmpipe.nn.presets import DENOISER_PRESETS
from gmpipe.registry import CONDITIONINGS, SAMPLERS


class TrainLDMConfig(ComposedSection):
    """The loop's keys (``loop``) and the objective's (``objective``) are written flat beside the model's own.

    Denoiser ``preset`` sizes are in ``gmpipe.nn.presets``; ``p_uncond`` is the condition dropout that makes
    classifier-free guidance possible; the ``sample_*`` keys are the defaults stored with the model (and used for
    its sample grid)."""

    flat_parts = ("loop", "objective")

    loop: LoopConfig = LoopConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    conditioning: one_of(CONDITIONINGS) = "class"
    preset: one_of(DENOISER_PRESETS) = "small"
    p_uncond: Fraction = 0.1
    sampler: one_of(SAMPLERS) = "euler"
    sample_steps: Annotated[int, Field(ge=1, le=1000)] = 50
    guidance: Annotated[float, Field(ge=0.0, le=50.0)] = 1.0
    grid_per_class: Annotated[int, Field(ge=1, le=64)] = 8
