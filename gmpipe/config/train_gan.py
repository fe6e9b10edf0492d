"""``train_gan:`` the class-conditional GAN in the autoencoder's latent space: networks, game, R1, the loop, and
what the stage measures and samples."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from gmpipe.config.base import ComposedSection, PositiveInt, built_for, one_of
from gmpipe.config.loop import LoopConfig
from gmpipe.nn.presets import GAN_PRESETS
from gmpipe.registry import CONDITIONINGS, GAN_LOSSES

# The conditionings the GAN is built for (read by gmpipe.gan.family too): class-conditional norms and a projection
# discriminator, or nothing.
GAN_CONDITIONINGS = ("none", "class")


class TrainGANConfig(ComposedSection):
    """The loop's keys (``loop``) are written flat beside the GAN's own; ``lr`` is the generator's learning rate
    (and the discriminator's unless ``d_lr`` is set), the EMA is the generator's.

    ``preset`` sizes both networks (``gmpipe.nn.presets.GAN_PRESETS``); ``loss`` is the game
    (``gmpipe.registry.GAN_LOSSES``: minimax, non_saturating, hinge); ``r1_gamma`` the R1 penalty on real latents,
    applied every ``r1_every`` steps (lazily, that many times as strongly; 0 turns it off); ``spectral_norm`` wraps
    the discriminator's weights. ``truncation`` (psi) is the sampling default stored with the model. The stage
    writes a sample grid (``grid_per_class``), an interpolation grid (one slerp path per class,
    ``interpolation_steps`` images each) and the perceptual path length over ``ppl_pairs`` pairs, its distance on
    EfficientNet-Lite0 feature maps at ``ppl_image_size`` pixels."""

    flat_parts = ("loop",)

    loop: LoopConfig = LoopConfig()
    conditioning: one_of(CONDITIONINGS) = "class"
    preset: one_of(GAN_PRESETS) = "small"
    loss: one_of(GAN_LOSSES) = "non_saturating"
    r1_gamma: Annotated[float, Field(ge=0.0, le=1e4)] = 1.0
    r1_every: Annotated[int, Field(ge=1, le=1000)] = 4
    d_lr: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    spectral_norm: bool = False
    truncation: Annotated[float, Field(ge=0.0, le=10.0)] = 1.0
    grid_per_class: Annotated[int, Field(ge=1, le=64)] = 8
    interpolation_steps: Annotated[int, Field(ge=2, le=64)] = 8
    ppl_pairs: PositiveInt = 200
    ppl_image_size: Annotated[int, Field(ge=16, le=512)] = 64

    @field_validator("conditioning")
    @classmethod
    def _built(cls, kind: str) -> str:
        return built_for(kind, "the latent GAN", GAN_CONDITIONINGS)
