"""A small, fast decoder distilled from the autoencoder's (``train_decoder``): the decoder of a diffusers
``AutoencoderTiny`` (plain 3x3 convolutions and ReLUs, no normalization or attention, nearest upsampling), which
turns latents into images several times faster than the ``AutoencoderKL`` decoder it learnt from.

It reads *normalized* latents, (z - shift) * scale with the per-channel statistics the latents were cached with
(``gmpipe.data.latents.LatentStats``; the latents the generators produce, about unit variance): the decoder squashes
its input with 3 tanh(x / 3) first, which suits unit-variance latents and would flatten the raw ones' tails.
:class:`SmallDecoder` wraps it so that it takes raw latents like the autoencoder does (``decode(z).sample``), and
every family decodes through it unchanged (``gmpipe.nn.autoencoder.decode_latents``). The folder it is saved in is
described in ``gmpipe.decoder_folder``.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderTiny
from diffusers.models.autoencoders.vae import DecoderOutput


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


class SmallDecoder(torch.nn.Module):
    """A trained AutoencoderTiny decoder with the statistics of the latents it reads (a ``LatentStats``:
    ``normalize`` and per-channel ``shift``): ``decode(z)`` takes raw latents z (B, c, h, w), as the autoencoder's
    decoder does, and returns ``.sample`` images (B, C, H, W)."""

    def __init__(self, tiny: AutoencoderTiny, stats) -> None:
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
        """Normalized latents (B, c, h, w) -> images (B, C, H, W), not clamped: what training compares.

        The activations run channels-last: on the 2-core CPU decoding 300 latents took 18-20 vs 35-37 ms in bf16 and
        46 vs 80 ms in float32 (the same values in float32); the images come back in the default layout."""
        return self.tiny.decoder(normalized.contiguous(memory_format=torch.channels_last)).contiguous()

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        """Raw latents (B, c, h, w) -> ``DecoderOutput(sample=images)``, images (B, C, H, W) in about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"the small decoder reads latents (B, {self.latent_channels}, h, w), got "
                             f"{tuple(z.shape)}")
        return DecoderOutput(sample=self(self.stats.normalize(z)))
