"""``train_ar:`` the autoregressive prior over latent tokens: the tokenizer, the causal transformer, the loop, the
test likelihood and how it samples."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from gmpipe.config.base import ComposedSection, Fraction, PositiveInt, built_for, one_of
from gmpipe.config.loop import LoopConfig
from gmpipe.nn.presets import AR_PRESETS
from gmpipe.registry import CONDITIONINGS

# The conditionings the prior is built for (read by gmpipe.ar.family too): a class prefix, or nothing.
AR_CONDITIONINGS = ("none", "class")


class TrainARConfig(ComposedSection):
    """The loop's keys (``loop``) are written flat beside the prior's own.

    Tokenizer: ``bins`` bins per latent value over [-``clip``, ``clip``] of the normalized latents, ``spacing``
    uniform or quantile (``gmpipe.ar.tokenizer``), fitted on the training latents. ``posterior``: ``sample``
    tokenizes a fresh z = mean + std * eps at every step, ``mean`` the posterior mean. ``preset`` sizes the GPT-2
    transformer (``gmpipe.nn.presets.AR_PRESETS``); ``p_uncond`` is the class dropout for classifier-free guidance.
    ``nll_items`` test latents give the exact test likelihood (null: the whole test split). ``guidance``,
    ``temperature`` and ``top_k`` are the sampling defaults stored with the model (and used for its grid)."""

    flat_parts = ("loop",)

    loop: LoopConfig = LoopConfig()
    conditioning: one_of(CONDITIONINGS) = "class"
    preset: one_of(AR_PRESETS) = "small"
    bins: Annotated[int, Field(ge=2, le=4096)] = 32
    clip: Annotated[float, Field(gt=0.0, le=100.0)] = 3.0
    spacing: Literal["uniform", "quantile"] = "uniform"
    posterior: Literal["sample", "mean"] = "sample"
    dropout: Fraction = 0.0
    p_uncond: Fraction = 0.1
    nll_items: PositiveInt | None = None
    guidance: Annotated[float, Field(ge=0.0, le=50.0)] = 1.0
    temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    top_k: PositiveInt | None = None
    grid_per_class: Annotated[int, Field(ge=1, le=64)] = 8

    @field_validator("conditioning")
    @classmethod
    def _built(cls, kind: str) -> str:
        return built_for(kind, "the autoregressive prior", AR_CONDITIONINGS)

    @model_validator(mode="after")
    def _top_k_within_bins(self):
        if self.top_k is not None and self.top_k > self.bins:
            raise ValueError(f"top_k must be <= bins (got top_k {self.top_k} and bins {self.bins})")
        return self
