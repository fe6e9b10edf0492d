"""Distilling the autoencoder's decoder into a small one (``train_decoder``), on cached latents rather than images:

    L(phi) = E_z [ || D_phi((z - shift) * scale) - D(z) ||_1 + lambda_p d(D_phi(...), D(z)) ],   z ~ q(z | x)

z is a fresh posterior sample of a training image (``gmpipe.data.latents``), D the frozen autoencoder decoder
(its image, clamped to [-1, 1], is the target: the small decoder learns to draw what the full one draws, on the
latents the generators are trained to produce), D_phi the small decoder (``gmpipe.nn.small_decoder``) and d the
optional perceptual distance (``gmpipe.vae.perceptual``) with weight lambda_p.
"""

from __future__ import annotations

import torch
from torch import nn

from gmpipe.nn.small_decoder import SmallDecoder
from gmpipe.train.step import LossStep


def decoder_distillation_step(small: SmallDecoder, autoencoder: nn.Module, perceptual: nn.Module | None = None,
                              perceptual_weight: float = 0.0, name: str = "decoder") -> LossStep:
    """The loop's step for batches of raw latents z (B, c, h, w): L1 (and the weighted perceptual distance) between
    the small decoder's image of the normalized z and the frozen ``autoencoder``'s image of z."""
    autoencoder.requires_grad_(False).eval()
    if perceptual is not None:
        perceptual.requires_grad_(False).eval()

    def loss(z, step, context, modules):
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
