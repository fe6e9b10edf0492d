"""The perceptual terms' keys shared by ``train_vae`` and ``train_decoder``."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from gmpipe.nn.effnet_blocks import NUM_BLOCKS


def _each_once(blocks: list[int]) -> list[int]:
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"each block at most once (got {blocks})")
    return sorted(blocks)


# EfficientNet-Lite0 MBConv blocks whose outputs a perceptual term compares: each an index below NUM_BLOCKS, at
# most once, kept sorted (the network computes them in order, so [2, 0] is the term [0, 2] is). Defaults are
# validated too, so a section's default is in the form a params file's value takes.
PerceptualBlocks = Annotated[list[Annotated[int, Field(ge=0, le=NUM_BLOCKS - 1)]],
                             Field(min_length=1, validate_default=True), AfterValidator(_each_once)]
