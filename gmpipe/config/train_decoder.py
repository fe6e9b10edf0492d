"""``train_decoder:`` the small decoder distilled from the autoencoder's, its size, its losses and the loop."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gmpipe.config.base import ComposedSection, PositiveInt
from gmpipe.config.loop import LoopConfig
from gmpipe.config.perceptual import PerceptualBlocks
from gmpipe.nn.effnet_blocks import DEFAULT_MAP_BLOCKS


class TrainDecoderConfig(ComposedSection):
    """The loop's keys (``loop``) are written flat beside the decoder's own.

    The decoder (``gmpipe.nn.small_decoder``) has ``width`` channels throughout, ``blocks`` residual blocks at every
    resolution below the image's (one stage per doubling, as many as the autoencoder's downsampling factor needs)
    and ``full_resolution_blocks`` at the image's. It learns the autoencoder decoder's image of fresh posterior
    samples of the cached training latents (L1), plus ``perceptual_weight`` times the perceptual distance to it
    (``gmpipe.vae.perceptual`` on EfficientNet-Lite0 features at ``perceptual_image_size``: the outputs of its MBConv
    blocks ``perceptual_blocks``, each in 0..15; ``perceptual_weight: 0`` turns the term off). The stage compares both
    decoders on ``eval_images`` test latents.

    ``target_pool``: 0 decodes a fresh posterior sample of every batch item with the autoencoder at every step;
    N > 0 decodes N posterior samples once, before the loop, and draws the batches from them (a step then costs
    only the small decoder and the perceptual term; the pool is part of what defines the model)."""

    flat_parts = ("loop",)

    loop: LoopConfig = LoopConfig()
    width: Annotated[int, Field(ge=1, le=1024)] = 16
    blocks: Annotated[int, Field(ge=0, le=16)] = 2
    full_resolution_blocks: Annotated[int, Field(ge=0, le=16)] = 0
    perceptual_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    perceptual_image_size: Annotated[int, Field(ge=16, le=512)] = 32
    perceptual_blocks: PerceptualBlocks = list(DEFAULT_MAP_BLOCKS)
    target_pool: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    eval_images: PositiveInt = 1000
