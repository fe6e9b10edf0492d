"""The KL autoencoder as a density model: a decoder likelihood P(x | z) over 8-bit pixels, the negative ELBO in bits
per dimension, and ``vae_prior.json``, which stores beside the autoencoder what these and prior sampling need.

The autoencoder of ``train_vae`` is a latent-variable model p(x) = integral P(x | z) p(z) dz with the prior
p(z) = N(0, I) over latents (c, h, w) in its own (raw, un-normalized) latent space and the decoder D. Its negative
ELBO (Kingma & Welling 2014, eq. 10; ``gmpipe.vae.elbo``) is an upper bound on -log P(x):

    -ELBO(x) = E_q(z|x)[-log P(x | z)] + KL(q(z | x) || N(0, I)),

with the expectation estimated by one posterior sample per image (from the image's own seed) and the KL in closed
form. The observation model P(x | z) is a Gaussian of mean D(z) discretized to the 256 levels of each 8-bit pixel
(:func:`discretized_gaussian_log_prob`) with one scale sigma per model, so the bound is on the probability of the
actual images and needs no dequantization. The training losses set no scale (an L1 or L2 sum, plus perceptual and
GAN terms), so ``train_vae`` fits sigma on validation images as the maximum-likelihood scale of a Gaussian decoder,
sigma^2 = the mean squared error of D(z) there (:func:`fit_decoder_std`), and stores it in ``vae_prior.json``.

This module imports no model family, so ``train_vae`` can use it without depending on their code;
``gmpipe.vae.prior`` turns a folder with ``vae_prior.json`` into a Generator.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from gmpipe.artifacts import read_json
from gmpipe.pixels import uint8_to_signed
from gmpipe.seeds import SampleNoise
from gmpipe.vae.elbo import kl_divergence

PRIOR_FILE = "vae_prior.json"
LEVELS = 256  # 8-bit pixels
BIN_HALF_WIDTH = 1.0 / (LEVELS - 1)  # half the distance between two levels on the [-1, 1] scale
BATCH_SIZE = 256


class PriorFile(BaseModel):
    """``vae_prior.json``: the image and latent shapes (C, H, W) and (c, h, w), the decoder scale sigma (on the
    [-1, 1] pixel scale) and the split it was fitted on, and the dataset's class names."""

    model_config = ConfigDict(extra="allow", strict=True)
    image_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    latent_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    decoder_std: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    decoder_std_fitted_on: str
    class_names: list[str]

    def save(self, folder: Path) -> None:
        (Path(folder) / PRIOR_FILE).write_text(json.dumps(self.model_dump(), indent=2))

    @classmethod
    def load(cls, folder: Path, stage: str) -> PriorFile:
        """``folder/vae_prior.json``; a missing or damaged one is one ArtifactError naming it and ``stage``."""
        return read_json(Path(folder) / PRIOR_FILE, stage, cls.model_validate)


def discretized_gaussian_log_prob(images: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """log P(x | mean, std) of uint8 images under a Gaussian discretized to the 256 pixel levels, per image (B,),
    summed over the C x H x W pixels, in nats (float64).

    Level k sits at x = k / 127.5 - 1 and owns the bin [x - 1/255, x + 1/255]; the outermost levels own the
    tails (Salimans et al. 2017, PixelCNN++, eq. 2):

        P(k) = Phi((x + 1/255 - mean) / std) - Phi((x - 1/255 - mean) / std),   Phi(-inf) = 0, Phi(inf) = 1.

    The difference is taken on the side of the mean where both CDFs are small (log Phi is accurate in the lower
    tail), so far-off pixels keep a finite, accurate log-probability. images: uint8 (B, C, H, W); mean: (B, C, H, W)
    on the [-1, 1] scale.
    """
    images = torch.as_tensor(images).to(mean.device)
    x = images.double() / 127.5 - 1.0  # gmpipe.pixels' convention, in float64: the levels are exact
    mean = mean.double()
    std = torch.as_tensor(std, dtype=torch.float64, device=mean.device)
    upper = (x + BIN_HALF_WIDTH - mean) / std
    lower = (x - BIN_HALF_WIDTH - mean) / std
    upper = torch.where(images == LEVELS - 1, torch.full_like(upper, math.inf), upper)
    lower = torch.where(images == 0, torch.full_like(lower, -math.inf), lower)
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): reflect bins above the mean into the lower tail.
    above = lower > 0
    upper, lower = torch.where(above, -lower, upper), torch.where(above, -upper, lower)
    log_upper, log_lower = torch.special.log_ndtr(upper), torch.special.log_ndtr(lower)
    log_prob = log_upper + torch.log1p(-torch.exp(log_lower - log_upper))
    return log_prob.flatten(1).sum(dim=1)


def negative_elbo_nats(images: Tensor, decoded: Tensor, posterior_mean: Tensor, posterior_logvar: Tensor,
                       decoder_std: float) -> tuple[Tensor, Tensor]:
    """The two terms of -ELBO per image, in nats (B,) each: -log P(x | z) of uint8 ``images`` (B, C, H, W) under
    the discretized Gaussian with mean ``decoded`` = D(z) for one posterior sample z, and KL(q(z | x) || N(0, I))
    of the posterior (B, c, h, w) in closed form."""
    reconstruction = -discretized_gaussian_log_prob(images, decoded, decoder_std)
    kl = torch.stack([kl_divergence(m[None].double(), v[None].double())
                      for m, v in zip(posterior_mean, posterior_logvar, strict=True)])
    return reconstruction, kl


@torch.no_grad()
def posterior_sample_decoded(vae, images: np.ndarray, noise: SampleNoise, device: torch.device | str = "cpu"):
    """Encode uint8 images (B, C, H, W), draw z = mean + std * eps with eps from each image's own stream, decode.
    Returns (decoded (B, C, H, W) in [-1, 1], posterior mean, posterior logvar), on the CPU."""
    posterior = vae.encode(uint8_to_signed(torch.as_tensor(images)).to(device)).latent_dist
    eps = noise.randn(tuple(posterior.mean.shape)).to(device)
    z = posterior.mean + posterior.std * eps
    decoded = vae.decode(z).sample.clamp(-1, 1)
    return decoded.cpu(), posterior.mean.cpu(), posterior.logvar.cpu()


def fit_decoder_std(vae, images: np.ndarray, seeds: Sequence[int], batch_size: int = BATCH_SIZE,
                    device: torch.device | str = "cpu") -> float:
    """The maximum-likelihood scale of a Gaussian decoder on uint8 ``images`` (N, C, H, W) (a split the ELBO is not
    reported on): sigma = sqrt(mean over pixels of (x - D(z))^2), z one posterior sample per image from seeds[i]."""
    noise = SampleNoise(seeds)
    squared, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        decoded, _, _ = posterior_sample_decoded(vae, images[start:stop], noise.take(start, stop), device)
        squared += float((decoded.double() - uint8_to_signed(images[start:stop]).double()).square().sum())
        count += decoded.numel()
    return max(math.sqrt(squared / max(count, 1)), BIN_HALF_WIDTH)


def negative_elbo_bits(vae, images: np.ndarray, seeds: Sequence[int], decoder_std: float,
                       batch_size: int = BATCH_SIZE, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """-ELBO of uint8 ``images`` (N, C, H, W) in bits per pixel dimension, as its two terms per image: the
    reconstruction term and the KL, (N,) each (their sum is the bound); image i's posterior sample from seeds[i]."""
    noise = SampleNoise(seeds)
    reconstruction, kl = [], []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        decoded, mean, logvar = posterior_sample_decoded(vae, images[start:stop], noise.take(start, stop), device)
        rec, kl_nats = negative_elbo_nats(torch.as_tensor(images[start:stop]), decoded, mean, logvar, decoder_std)
        reconstruction.append(rec)
        kl.append(kl_nats)
    to_bits = 1.0 / (math.prod(images.shape[1:]) * math.log(2))
    return torch.cat(reconstruction) * to_bits, torch.cat(kl) * to_bits
