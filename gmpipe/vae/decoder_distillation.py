"""Distilling the autoencoder's decoder into a small one (``train_decoder``), on cached latents rather than images:

    L(phi) = E_z [ || D_phi((z - shift) * scale) - D(z) ||_1 + lambda_p d(D_phi(...), D(z)) ],   z ~ q(z | x)

z is a fresh posterior sample of a training image (``gmpipe.data.latents``), D the frozen autoencoder decoder
(its image, clamped to [-1, 1], is the target: the small decoder learns to draw what the full one draws, on the
latents the generators are trained to produce), D_phi the small decoder (``gmpipe.nn.small_decoder``) and d the
optional perceptual distance (``gmpipe.vae.perceptual``) with weight lambda_p.

With a target pool (``decoded_targets``), z is drawn from N posterior samples fixed before training, each decoded
by D once: the expectation is then over those N samples, and a step no longer pays for the frozen decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from gmpipe.data.latents import LatentSplit
from gmpipe.nn.autoencoder import autoencoder_passes
from gmpipe.nn.small_decoder import SmallDecoder
from gmpipe.train.step import LossStep


def decoder_distillation_step(small: SmallDecoder, autoencoder: nn.Module, perceptual: nn.Module | None = None,
                              perceptual_weight: float = 0.0, name: str = "decoder") -> LossStep:
    """The loop's step for batches of raw latents z (B, c, h, w), or of pairs (z, the autoencoder's image of z) from
    a target pool: L1 (and the weighted perceptual distance) between the small decoder's image of the normalized z
    and the frozen ``autoencoder``'s image of z (decoded in the step when the batch is z alone)."""
    autoencoder.requires_grad_(False).eval()
    if perceptual is not None:
        perceptual.requires_grad_(False).eval()

    def loss(batch, step, context, modules):
        if isinstance(batch, tuple):  # (z, its decoded target) from a target pool
            z, target = batch
        else:
            z = batch
            with torch.no_grad():
                target = autoencoder.decode(z).sample.clamp(-1, 1)
        image = modules[name](small.stats.normalize(z))
        l1 = (image - target).abs().mean()
        terms = {"l1": l1.detach()}
        total = l1
        if perceptual is not None and perceptual_weight > 0:
            distance = perceptual(image, target).mean()
            terms["perceptual"] = distance.detach()
            total = total + perceptual_weight * distance
        terms["loss"] = total.detach()
        return total, terms

    return LossStep(name, small, loss)


@torch.no_grad()
def decoded_targets(autoencoder: nn.Module, split: LatentSplit, n: int, seed: int, batch_size: int,
                    autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """A target pool: n posterior samples z of the training latents (every item once per pass over a permutation
    seeded with ``seed``, as many passes as n needs; the noise drawn batch by batch from the same seeded generator)
    and the frozen ``autoencoder``'s images of them, clamped to [-1, 1] and decoded under ``autocast()`` (the loop's
    precision) in batches of ``batch_size``, written into tensors allocated once (the pool plus one batch of
    memory). The same seed gives the same pool, so a resumed run trains on the pool it started with. Returns
    (z (n, c, h, w), images (n, C, H, W))."""
    generator = torch.Generator().manual_seed(seed)
    passes = -(-n // len(split))
    index = torch.cat([torch.randperm(len(split), generator=generator) for _ in range(passes)])[:n]
    device = next(autoencoder.parameters()).device
    z = images = None
    for first in range(0, n, batch_size):
        batch = split.sample(index[first:first + batch_size], generator=generator)
        with autocast():
            parts = autoencoder_passes(batch.to(device), device)
            decoded = torch.cat([autoencoder.decode(part).sample for part in parts])
        if z is None:
            z = torch.empty((n, *batch.shape[1:]), dtype=batch.dtype)
            images = torch.empty((n, *decoded.shape[1:]), dtype=torch.float32)
        z[first:first + len(batch)] = batch
        images[first:first + len(batch)] = decoded.clamp(-1, 1).float().cpu()
    return z, images


def target_pool_bytes(n: int, latent_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> int:
    """Memory a pool of n float32 latents and images holds (``decoded_targets``)."""
    return 4 * n * (math.prod(latent_shape) + math.prod(image_shape))
