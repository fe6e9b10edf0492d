"""The VAE as a generator (the ``vae_prior`` family): samples decoded from the prior z ~ N(0, I), and the negative
ELBO of held-out images in bits per dimension as its likelihood (``gmpipe.vae.density``).

Sampling: z_i ~ N(0, T^2 I) in the autoencoder's raw latent space, from sample i's own seed (T = ``temperature``;
1 is the prior itself), x_i = D(z_i): one network evaluation per image. This is what a VAE generates without a
learned prior. Trained with a small KL weight, the encoder's latents need not look like N(0, I) (they carry detail
the KL would have taxed), so prior draws land where the decoder has seen few latents; at full KL weight they do look
like N(0, I), but the decoder has learnt to blur. Latent diffusion (or an autoregressive prior) learns the latents'
real density instead.

A folder of this family is the autoencoder's own (``models/vae``, written by ``train_vae``)::

    family.json          {"family": "vae_prior", "stage": "train_vae"} (gmpipe.family_file)
    vae_prior.json       image and latent shapes, the decoder scale sigma and where it was fitted, the class names
    config.json, diffusion_pytorch_model.safetensors   the autoencoder (diffusers AutoencoderKL)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmpipe.batching import even_batches
from gmpipe.conditioning import Request, Unconditional
from gmpipe.generator import DEFAULT_BATCH_SIZE, Generated, Generator, Likelihood, write_family
from gmpipe.nn.autoencoder import decode_latents, load_autoencoder
from gmpipe.pixels import signed_to_uint8
from gmpipe.seeds import SampleNoise
from gmpipe.vae.density import PriorFile, negative_elbo_bits

CAVEAT = ("an upper bound on -log2 P(x) of the 8-bit test images under a discretized Gaussian decoder with one fitted "
          "scale, close to the model's density only for a VAE trained on this ELBO (KL weight 1, Gaussian "
          "likelihood): an autoencoder trained with a small KL weight and L1, perceptual and GAN losses is not a "
          "calibrated density model, and its bound is loose")


def negative_elbo(vae, images: np.ndarray, seeds: Sequence[int], decoder_std: float,
                  batch_size: int = DEFAULT_BATCH_SIZE, device: torch.device | str = "cpu") -> Likelihood:
    """-ELBO of uint8 ``images`` (N, C, H, W) in bits per pixel dimension (``gmpipe.vae.density``), image i's
    posterior sample from seeds[i]; ``parts`` holds the reconstruction and KL terms."""
    reconstruction, kl = negative_elbo_bits(vae, images, seeds, decoder_std, batch_size, device)
    return Likelihood.from_items(
        reconstruction + kl, unit="bits/dim", space=f"8-bit pixels ({'x'.join(map(str, images.shape[1:]))})",
        kind="upper bound", method=f"negative ELBO, discretized Gaussian decoder (sigma {decoder_std:.4g}), 1 "
                                   "posterior sample per image", caveat=CAVEAT,
        parts={"reconstruction_bits_per_dim": float(reconstruction.mean()), "kl_bits_per_dim": float(kl.mean()),
               "decoder_std": decoder_std})


class VAEPrior(Generator):
    """The autoencoder decoding prior samples (module docstring). Settings: ``temperature`` (the std of z; 1 is the
    prior). Unconditional. The folder is the autoencoder's own, so ``load`` ignores ``autoencoder``."""

    def __init__(self, autoencoder: torch.nn.Module, prior: PriorFile, device: torch.device | str = "cpu") -> None:
        self.autoencoder = autoencoder
        self.prior = prior
        self.conditioning = Unconditional(prior.class_names)
        self.settings = {"temperature": 1.0}
        self.device = torch.device(device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.prior.latent_shape)

    @classmethod
    def load(cls, folder: Path, stage: str, *, autoencoder: Path | None = None,
             device: torch.device | str = "cpu") -> VAEPrior:
        prior = PriorFile.load(folder, stage)
        return cls(load_autoencoder(folder).to(device), prior, device=device)

    def save(self, folder: Path, stage: str) -> None:
        """Write the autoencoder (diffusers format) and this family's files into ``folder``."""
        folder = Path(folder)
        self.autoencoder.to("cpu").save_pretrained(folder, safe_serialization=True)
        self.prior.save(folder)
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
        for start, stop in even_batches(len(seeds), batch_size):
            z = temperature * noise.take(start, stop).randn((stop - start, *self.latent_shape))
            with self.autocast():
                images.append(signed_to_uint8(decode_latents(self.autoencoder, z, self.device)))
        return Generated(np.concatenate(images), 1)

    def likelihood(self, images: np.ndarray, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Likelihood:
        """The negative ELBO of ``images`` in bits per pixel dimension (:func:`negative_elbo`)."""
        return negative_elbo(self.autoencoder, images, seeds, self.prior.decoder_std, batch_size, self.device)
