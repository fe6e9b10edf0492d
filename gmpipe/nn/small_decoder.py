"""A small, fast decoder distilled from the autoencoder's (``train_decoder``): the decoder of a diffusers
``AutoencoderTiny`` (plain 3x3 convolutions and ReLUs, no normalization or attention, nearest upsampling), which
turns latents into images several times faster than the ``AutoencoderKL`` decoder it learnt from.

It reads *normalized* latents, (z - shift) * scale with the per-channel statistics of ``latent_stats.json`` (the
latents the generators produce, about unit variance): the decoder squashes its input with 3 tanh(x / 3) first, which
suits unit-variance latents and would flatten the raw ones' tails. :class:`SmallDecoder` wraps it so that it takes
raw latents like the autoencoder does (``decode(z).sample``), and every family decodes through it unchanged
(``gmpipe.nn.autoencoder.decode_latents``).

``models/decoder/`` (written by ``train_decoder``)::

    config.json, diffusion_pytorch_model.safetensors   the AutoencoderTiny (diffusers format; from_pretrained)
    latent_stats.json    the shift and scale of the latents it reads (copied from data/latents/stats.json)
    decoder.json         what it was distilled from (the autoencoder's weights hash), the latent and image shapes

Only the decoder is trained: the folder's encoder is the smallest AutoencoderTiny allows and is never used (encode
with the autoencoder). In diffusers alone::

    tiny = AutoencoderTiny.from_pretrained("models/decoder")
    images = tiny.decode((z - shift) * scale).sample       # shift, scale (1, c, 1, 1) from latent_stats.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import torch
from diffusers import AutoencoderTiny
from diffusers.models.autoencoders.vae import DecoderOutput
from pydantic import BaseModel, ConfigDict, Field

from gmpipe.artifacts import ArtifactError, load_model_folder, read_json
from gmpipe.data.latents import LatentStats

STAGE = "train_decoder"
DECODER_INFO = "decoder.json"
LATENT_STATS = "latent_stats.json"
WEIGHTS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


class DecoderInfo(BaseModel):
    """``decoder.json``: the autoencoder it was distilled from (hash of its weights file), shapes, training facts."""

    model_config = ConfigDict(extra="allow", strict=True)
    autoencoder_sha256: str
    latent_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    image_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]


def build_small_decoder(latent_channels: int, image_channels: int, factor: int, width: int, blocks: int,
                        full_resolution_blocks: int = 0) -> AutoencoderTiny:
    """An AutoencoderTiny whose decoder maps normalized latents (B, latent_channels, h, w) to images
    (B, image_channels, h * factor, w * factor) in about [-1, 1]: log2(factor) stages of ``blocks`` residual blocks,
    each followed by a 2x upsampling and a conv, then ``full_resolution_blocks`` blocks and the output conv; ``width``
    channels throughout (AutoencoderTiny's stages hand each other that many)."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"the downsampling factor must be a power of 2 (got {factor})")
    stages = int(math.log2(factor)) + 1
    return AutoencoderTiny(
        in_channels=image_channels, out_channels=image_channels, latent_channels=latent_channels,
        decoder_block_out_channels=(width,) * stages,
        num_decoder_blocks=(blocks,) * (stages - 1) + (full_resolution_blocks,),
        encoder_block_out_channels=(1,) * stages, num_encoder_blocks=(0,) * stages,  # never trained nor used
    )


def decoder_factor(tiny: AutoencoderTiny) -> int:
    """How many times larger than the latents its images are."""
    return 2 ** (len(tiny.config.num_decoder_blocks) - 1)


class SmallDecoder(torch.nn.Module):
    """A trained AutoencoderTiny decoder with the statistics of the latents it reads: ``decode(z)`` takes raw
    latents z (B, c, h, w), as the autoencoder's decoder does, and returns ``.sample`` images (B, C, H, W)."""

    def __init__(self, tiny: AutoencoderTiny, stats: LatentStats) -> None:
        super().__init__()
        self.tiny = tiny
        self.stats = stats
        if len(stats.shift) != self.latent_channels:
            raise ValueError(f"{len(stats.shift)} latent channels in the statistics but the decoder reads "
                             f"{self.latent_channels}")

    @property
    def latent_channels(self) -> int:
        return int(self.tiny.config.latent_channels)

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, c, h, w) -> images (B, C, H, W), not clamped: what training compares."""
        return self.tiny.decoder(normalized)

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        """Raw latents (B, c, h, w) -> ``DecoderOutput(sample=images)``, images (B, C, H, W) in about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"the small decoder reads latents (B, {self.latent_channels}, h, w), got "
                             f"{tuple(z.shape)}")
        return DecoderOutput(sample=self(self.stats.normalize(z)))

    def save(self, folder: Path, info: dict, stats_file: Path) -> None:
        """Write the decoder folder (module docstring); ``stats_file`` is copied as ``latent_stats.json``."""
        folder = Path(folder)
        self.tiny.to("cpu").save_pretrained(folder, safe_serialization=True)
        (folder / LATENT_STATS).write_text(Path(stats_file).read_text())
        (folder / DECODER_INFO).write_text(json.dumps(DecoderInfo.model_validate(info).model_dump(), indent=2))


def load_small_decoder(folder: str | Path) -> tuple[SmallDecoder, DecoderInfo]:
    """The decoder in ``folder`` (``models/decoder``) on the CPU in eval mode, and its ``decoder.json``; a missing or
    damaged folder is one ArtifactError naming it."""
    folder = Path(folder)
    load = lambda path: AutoencoderTiny.from_pretrained(path, use_safetensors=True).eval()  # noqa: E731
    tiny = load_model_folder(load, folder, STAGE, "small decoder", WEIGHTS_FILES)
    info = read_json(folder / DECODER_INFO, STAGE, DecoderInfo.model_validate)
    stats = LatentStats.load(folder / LATENT_STATS, STAGE)
    try:
        return SmallDecoder(tiny, stats).eval(), info
    except ValueError as exc:
        raise ArtifactError(folder / LATENT_STATS, str(exc), STAGE) from None
