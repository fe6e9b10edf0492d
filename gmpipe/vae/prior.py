"""The VAE as a generative model on its own: samples decoded from the prior z ~ N(0, I) (the ``vae_prior``
family), and its negative ELBO on held-out images in bits per dimension.

The KL autoencoder of ``train_vae`` is a latent-variable model p(x) = integral P(x | z) p(z) dz with the prior
p(z) = N(0, I) over latents (c, h, w) in the autoencoder's own (raw, un-normalized) latent space and the decoder D.

Sampling: z_i ~ N(0, T^2 I) from sample i's own seed (T = ``temperature``; 1 is the prior itself), x_i = D(z_i):
one network evaluation per image. This is what a VAE generates without a learned prior. Trained with a small KL
weight, the encoder's latents need not look like N(0, I) (they carry detail the KL would have taxed), so prior
draws land where the decoder has seen few latents; at full KL weight they do look like N(0, I), but the decoder
has learnt to blur. Latent diffusion (or an autoregressive prior) learns the latents' real density instead.

Likelihood: the negative ELBO (Kingma & Welling 2014, eq. 10; ``gmpipe.vae.elbo``), an upper bound on -log P(x):

    -ELBO(x) = E_q(z|x)[-log P(x | z)] + KL(q(z | x) || N(0, I)),

with the expectation estimated by one posterior sample per image (from the image's seed) and the KL in closed
form. The observation model P(x | z) is a discretized Gaussian over the 256 levels of each 8-bit pixel
(:func:`discretized_gaussian_log_prob`), mean D(z) and one scale sigma per model (``decoder_std``), so the bound is
on the probability of the actual 8-bit images and needs no dequantization. The training losses fix no scale (an L1
or L2 sum, plus perceptual and GAN terms), so ``train_vae`` fits sigma on the validation split as the maximum-
likelihood scale of a Gaussian decoder, sigma^2 = the mean squared error of D(z) there, and stores it here.

A folder of this family is the autoencoder's own (``models/vae``, written by ``train_vae``)::

    family.json          {"family": "vae_prior", "stage": "train_vae"} (gmpipe.generator)
    conditioning.json    unconditional (the dataset's class names kept for reference)
    vae_prior.json       image and latent shapes, the decoder scale sigma and where it was fitted
    config.json, diffusion_pytorch_model.safetensors   the autoencoder (diffusers AutoencoderKL)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from gmpipe.artifacts import read_json
from gmpipe.conditioning import Conditioning, Request
from gmpipe.generator import DEFAULT_BATCH_SIZE, Generated, Generator, Likelihood, write_family
from gmpipe.nn.autoencoder import load_autoencoder
from gmpipe.pixels import signed_to_uint8, uint8_to_signed
from gmpipe.seeds import SampleNoise
from gmpipe.vae.elbo import kl_divergence

PRIOR_FILE = "vae_prior.json"
LEVELS = 256  # 8-bit pixels
BIN_HALF_WIDTH = 1.0 / (LEVELS - 1)  # half the distance between two levels on the [-1, 1] scale

CAVEAT = ("an upper bound on -log2 P(x) of the 8-bit test images under a discretized Gaussian decoder with one fitted "
          "scale, close to the model's density only for a VAE trained on this ELBO (KL weight 1, Gaussian "
          "likelihood): an autoencoder trained with a small KL weight and L1, perceptual and GAN losses is not a "
          "calibrated density model, and its bound is loose")


class PriorFile(BaseModel):
    """``vae_prior.json``: the shapes the autoencoder reads and writes, and the decoder's observation scale."""

    model_config = ConfigDict(extra="allow", strict=True)
    image_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    latent_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    decoder_std: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    decoder_std_fitted_on: str = ""


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


def fit_decoder_std(vae, images: np.ndarray, seeds: Sequence[int], batch_size: int = DEFAULT_BATCH_SIZE,
                    device: torch.device | str = "cpu") -> float:
    """The maximum-likelihood scale of a Gaussian decoder on uint8 ``images`` (N, C, H, W) (a split the ELBO is not
    reported on): sigma = sqrt(mean over pixels of (x - D(z))^2), z one posterior sample per image."""
    noise = SampleNoise(seeds)
    squared, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        decoded, _, _ = posterior_sample_decoded(vae, images[start:stop], noise.take(start, stop), device)
        squared += float((decoded.double() - uint8_to_signed(images[start:stop]).double()).square().sum())
        count += decoded.numel()
    return max(math.sqrt(squared / max(count, 1)), BIN_HALF_WIDTH)


def negative_elbo(vae, images: np.ndarray, seeds: Sequence[int], decoder_std: float,
                  batch_size: int = DEFAULT_BATCH_SIZE, device: torch.device | str = "cpu") -> Likelihood:
    """-ELBO of uint8 ``images`` (N, C, H, W) in bits per pixel dimension (module docstring), image i's posterior
    sample from seeds[i]; ``parts`` holds the reconstruction and KL terms in bits per dimension."""
    noise = SampleNoise(seeds)
    reconstruction, kl = [], []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        decoded, mean, logvar = posterior_sample_decoded(vae, images[start:stop], noise.take(start, stop), device)
        rec, kl_nats = negative_elbo_nats(torch.as_tensor(images[start:stop]), decoded, mean, logvar, decoder_std)
        reconstruction.append(rec)
        kl.append(kl_nats)
    dims = math.prod(images.shape[1:])
    to_bits = 1.0 / (dims * math.log(2))
    reconstruction_bits, kl_bits = torch.cat(reconstruction) * to_bits, torch.cat(kl) * to_bits
    return Likelihood.from_items(
        reconstruction_bits + kl_bits, unit="bits/dim", space=f"8-bit pixels ({'x'.join(map(str, images.shape[1:]))})",
        kind="upper bound", method=f"negative ELBO, discretized Gaussian decoder (sigma {decoder_std:.4g}), 1 "
                                   "posterior sample per image", caveat=CAVEAT,
        parts={"reconstruction_bits_per_dim": float(reconstruction_bits.mean()),
               "kl_bits_per_dim": float(kl_bits.mean()), "decoder_std": decoder_std})


class VAEPrior(Generator):
    """The autoencoder decoding prior samples (module docstring). Settings: ``temperature`` (the std of z; 1 is the
    prior). The folder is the autoencoder's own, so ``load`` ignores ``autoencoder``."""

    def __init__(self, autoencoder: torch.nn.Module, prior: PriorFile, conditioning: Conditioning,
                 settings: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> None:
        self.autoencoder = autoencoder
        self.prior = prior
        self.conditioning = conditioning
        self.settings = {"temperature": 1.0, **(settings or {})}
        self.device = torch.device(device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.prior.latent_shape)

    @classmethod
    def load(cls, folder: Path, stage: str, *, autoencoder: Path | None = None,
             device: torch.device | str = "cpu") -> VAEPrior:
        folder = Path(folder)
        prior = read_json(folder / PRIOR_FILE, stage, PriorFile.model_validate)
        conditioning = Conditioning.load(folder, stage)
        return cls(load_autoencoder(folder).to(device), prior, conditioning, device=device)

    def save(self, folder: Path, stage: str) -> None:
        """Write the autoencoder (diffusers format) and this family's files into ``folder``."""
        folder = Path(folder)
        self.autoencoder.to("cpu").save_pretrained(folder, safe_serialization=True)
        (folder / PRIOR_FILE).write_text(json.dumps(self.prior.model_dump(), indent=2))
        self.conditioning.save(folder)
        write_family(folder, VAEPrior, stage)

    @torch.no_grad()
    def generate(self, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, **settings: Any) -> Generated:
        if not seeds:
            raise ValueError("generate: give at least one seed")
        temperature = float(self.resolve_settings(settings)["temperature"])
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.requests_for(requests, seeds)  # one request per seed, or none
        noise = SampleNoise(seeds)
        images = []
        for start in range(0, len(seeds), batch_size):
            stop = min(start + batch_size, len(seeds))
            z = temperature * noise.take(start, stop).randn((stop - start, *self.latent_shape))
            images.append(signed_to_uint8(self.autoencoder.decode(z.to(self.device)).sample))
        return Generated(np.concatenate(images), 1)

    def likelihood(self, images: np.ndarray, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Likelihood:
        """The negative ELBO of ``images`` in bits per pixel dimension (:func:`negative_elbo`)."""
        return negative_elbo(self.autoencoder, images, seeds, self.prior.decoder_std, batch_size, self.device)


def prior_file(image_shape: Sequence[int], latent_shape: Sequence[int], decoder_std: float,
               fitted_on: str) -> PriorFile:
    """The ``vae_prior.json`` content for an autoencoder of these shapes and decoder scale."""
    return PriorFile(image_shape=list(image_shape), latent_shape=list(latent_shape), decoder_std=float(decoder_std),
                     decoder_std_fitted_on=fitted_on)
