"""The autoencoder's training forward as one module: x -> q(z | x) -> z ~ q(z | x) -> x_hat.

Data-parallel training (DistributedDataParallel, which ``accelerator.prepare`` applies with several processes)
wraps a module and all-reduces the gradients of what its ``forward`` used. ``AutoencoderKL`` has no forward that
returns the posterior, and the wrapper exposes no ``encode`` / ``decode``: encoding, sampling and decoding
therefore run inside :class:`SampledReconstruction.forward`, the call the wrapper sees.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import AutoencoderKL
from torch import nn


class Reconstruction(NamedTuple):
    """What the autoencoder losses need from one forward: x_hat (B, C, H, W) decoded from a posterior sample,
    and the posterior's mean and log-variance (B, c, h, w) each."""

    x_hat: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor


class SampledReconstruction(nn.Module):
    """``forward(x)``: images (B, C, H, W) in [-1, 1] -> :class:`Reconstruction`, decoding a reparameterised
    sample z = mean + std * eps (eps from the global RNG) so that the gradient reaches the encoder.

    ``vae`` is the trained ``AutoencoderKL`` itself (not a copy): save ``module.vae`` as the model.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> Reconstruction:
        posterior = self.vae.encode(x).latent_dist
        x_hat = self.vae.decode(posterior.sample()).sample
        return Reconstruction(x_hat, posterior.mean, posterior.logvar)
