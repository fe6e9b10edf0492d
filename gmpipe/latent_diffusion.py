"""The latent diffusion family: a denoiser, the objective it was trained with, the latent scale and shift, its
conditioning and sampling defaults, and the autoencoder that decodes its latents, as one :class:`Generator`.

``models/ldm/`` (written by ``train_ldm``) and every ``models/student/<name>/`` (written by ``distill``) hold::

    family.json          {"family": "latent_diffusion", "stage": ...} (gmpipe.generator)
    denoiser/            the weights sampling uses (the EMA weights), diffusers format
    objective.json       the generalized objective it was trained with (schedule, target, time density, weighting)
    sampling.json        default sampler, steps, guidance weight and the time grid's resolution shift
    conditioning.json    what it is conditioned on (gmpipe.conditioning)
    latent_stats.json    the latent shift and scale measured by cache_latents (copied from data/latents/stats.json)

Generation (Generator.generate): per sample, the starting noise x_1 (c, h, w) and every later random draw of the
sampler come from that sample's own seed; the sampler integrates from t = 1 to 0 with classifier-free guidance
at weight w (cond and null condition in one 2B-row pass), the latents are denormalized and decoded, and the images
come back as uint8.

Likelihood (Generator.likelihood): each image is encoded and one posterior sample z is drawn from its seed (the
latents the model was trained on), normalized, and scored under the probability-flow ODE of the model conditioned
on the image's class at w = 0 (log p(z | y); ``gmpipe.diffusion.likelihood``, Hutchinson trace with probes from the
same seed). Bits per dimension of the normalized latents, and of the raw latents through the normalization's
log-determinant.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gmpipe.artifacts import read_json
from gmpipe.batching import even_batches
from gmpipe.conditioning import Conditioning, Request
from gmpipe.data.latents import LatentStats
from gmpipe.diffusion import Objective, make_guided_model_fn
from gmpipe.diffusion.likelihood import bits_per_dim, normalization_log_det, ode_log_likelihood
from gmpipe.errors import GmpipeError
from gmpipe.generator import (
    DEFAULT_BATCH_SIZE,
    LATENT_STATS,
    SAMPLING,
    Generated,
    LatentGenerator,
    Likelihood,
    write_latent_model_files,
)
from gmpipe.nn.autoencoder import load_autoencoder
from gmpipe.nn.denoiser import Denoiser
from gmpipe.pixels import signed_to_uint8, uint8_to_signed
from gmpipe.registry import SAMPLERS
from gmpipe.seeds import SampleNoise
from gmpipe.train.step import LossStep

OBJECTIVE = "objective.json"
WEIGHTS = "denoiser"

# The probability-flow-ODE likelihood's budget: 4 RK4 steps (16 network calls) and 2 Hutchinson probes per latent.
# On a 4x8x8 rectified-flow toy (tests/diffusion/test_likelihood.py) RK4 is 4th order; the probe noise averages
# out over the test items (each has its own probes), and the standard error reported includes it.
ODE_LIKELIHOOD = {"num_steps": 4, "integrator": "rk4", "num_probes": 2}
ODE_CAVEAT = ("the density of the model's probability-flow ODE (not of the SDE or DDPM samplers, and not a bound) "
              "of one posterior sample per test image, in the autoencoder's latent space: not comparable with "
              "bits per pixel or per token; a few-step Hutchinson estimate")


class SamplingFile(BaseModel):
    """``sampling.json``: the model's default sampler, steps, guidance weight, and the resolution shift of the time
    grid it was trained on (1 for models saved before it was stored)."""

    model_config = ConfigDict(extra="allow", strict=True)
    sampler: str
    steps: Annotated[int, Field(ge=1)]
    guidance: Annotated[float, Field(allow_inf_nan=False)]
    shift: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0

    @field_validator("sampler")
    @classmethod
    def _known(cls, name: str) -> str:
        SAMPLERS.lookup(name)
        return name


class LatentDiffusion(LatentGenerator):
    """Settings: ``sampler`` (a ``SAMPLERS`` name), ``steps``, ``guidance`` (w; 0 for unconditional models) and
    ``shift`` (the resolution shift of the sampling time grid). Networks run on ``device``; inputs and outputs stay
    on the CPU."""

    def __init__(self, denoiser: Denoiser, objective: Objective, stats: LatentStats, conditioning: Conditioning,
                 settings: dict[str, Any], autoencoder: torch.nn.Module | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.denoiser = denoiser
        self.objective = objective
        self.stats = stats
        self.conditioning = conditioning
        self.settings = SamplingFile.model_validate(dict(settings)).model_dump()
        self.autoencoder = autoencoder
        self.device = torch.device(device)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of the latents the denoiser works on."""
        return self.denoiser.in_channels, self.denoiser.sample_size, self.denoiser.sample_size

    @classmethod
    def load(cls, folder: Path, stage: str, *, autoencoder: Path | None = None, device: torch.device | str = "cpu",
             weights: str = WEIGHTS) -> LatentDiffusion:
        """The model in ``folder`` (``weights``: the weights sub-folder) and, if given, the autoencoder; a missing
        or damaged file is one ArtifactError naming it and ``stage``."""
        folder, device = Path(folder), torch.device(device)
        objective = read_json(folder / OBJECTIVE, stage, Objective.from_config)
        conditioning = Conditioning.load(folder, stage)
        settings = read_json(folder / SAMPLING, stage, SamplingFile.model_validate).model_dump()
        stats = LatentStats.load(folder / LATENT_STATS, stage)
        denoiser = Denoiser.from_pretrained(folder / weights, stage).eval().to(device)
        decoder = load_autoencoder(autoencoder).to(device) if autoencoder is not None else None
        return cls(denoiser, objective, stats, conditioning, settings, decoder, device)

    def save(self, folder: Path, stage: str, stats_file: Path | None = None) -> None:
        """Write the model folder (the layout above); ``stats_file`` is copied as ``latent_stats.json`` (keeping
        what cache_latents recorded with the stats), else the stats alone are written."""
        folder = Path(folder)
        self.denoiser.to("cpu").save_pretrained(folder / WEIGHTS)
        (folder / OBJECTIVE).write_text(json.dumps(self.objective.to_config(), indent=2))
        write_latent_model_files(folder, self, self.stats, stage, stats_file)

    @torch.no_grad()
    def generate(self, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, **settings: Any) -> Generated:
        if not seeds:
            raise ValueError("generate: give at least one seed")
        chosen = self.resolve_settings(settings)
        requests = self.requests_for(requests, seeds)
        noise = SampleNoise(seeds)
        images, nfe = [], 0
        for start, stop in even_batches(len(seeds), batch_size):
            cond = self.conditioning.encode(requests[start:stop], self.device)
            with self.autocast():
                latents, nfe = self.sample_latents(cond, noise.take(start, stop), **chosen)
                images.append(signed_to_uint8(self.decode(latents)))
        return Generated(np.concatenate(images), nfe)

    def likelihood(self, images: np.ndarray, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Likelihood:
        """-log2 p(z | y) / D of one posterior sample z per uint8 image (N, C, H, W) under the probability-flow ODE
        (module docstring), item i from seeds[i] and requests[i]; ``parts`` has the raw-latent bits per dim."""
        if self.autoencoder is None:
            raise GmpipeError("no autoencoder loaded: load the model with autoencoder=<the models/vae folder>")
        requests = self.requests_for(requests, seeds)
        noise = SampleNoise(seeds)
        log_likelihood = []
        for start, stop in even_batches(len(seeds), batch_size):
            stream = noise.take(start, stop)
            with torch.no_grad():
                posterior = self.autoencoder.encode(uint8_to_signed(images[start:stop]).to(self.device)).latent_dist
                z = posterior.mean + posterior.std * stream.randn(tuple(posterior.mean.shape)).to(self.device)
            cond = self.conditioning.encode(requests[start:stop], self.device)
            result = ode_log_likelihood(lambda x_t, t, cond=cond: self.denoiser(x_t, t, cond), self.objective,
                                        self.stats.normalize(z), generator=stream, **ODE_LIKELIHOOD)
            log_likelihood.append(result.log_likelihood.cpu())
        log_likelihood = torch.cat(log_likelihood).double()
        dims = math.prod(self.latent_shape)
        log_det = normalization_log_det(self.stats.scale, self.latent_shape)
        steps, probes = ODE_LIKELIHOOD["num_steps"], ODE_LIKELIHOOD["num_probes"]
        return Likelihood.from_items(
            bits_per_dim(log_likelihood, dims), unit="bits/dim",
            space=f"normalized latents ({'x'.join(map(str, self.latent_shape))})", kind="estimate",
            method=f"probability-flow ODE, {steps} {ODE_LIKELIHOOD['integrator'].upper()} steps, Hutchinson trace "
                   f"with {probes} Rademacher probes, at w = 0",
            caveat=ODE_CAVEAT,
            parts={"raw_latent_bits_per_dim": float(bits_per_dim(log_likelihood + log_det, dims).mean())})

    @torch.no_grad()
    def sample_latents(self, cond: Any, noise: SampleNoise, *, sampler: str, steps: int, guidance: float,
                       shift: float) -> tuple[torch.Tensor, int]:
        """Normalized latents (B, c, h, w) on the CPU for one batch of conditions (on ``device``) and per-sample
        noise streams, and the NFE per sample."""
        sample = SAMPLERS.lookup(sampler)
        w = guidance if self.conditioning.conditional else 0.0
        start = noise.randn((len(noise), *self.latent_shape)).to(self.device)  # x_1, row i from seed i
        null = self.denoiser.null_condition(len(noise), like=cond)
        model_fn = make_guided_model_fn(lambda x_t, t, c: self.denoiser(x_t, t, c), cond, null, w)
        latents, nfe = sample(model_fn, self.objective, start, steps, shift=shift, generator=noise)
        return latents.float().cpu(), nfe


def denoising_step(denoiser: Denoiser, objective: Objective, p_uncond: float, name: str = "denoiser") -> LossStep:
    """The family's training step for the one loop: the generalized objective with condition dropout,
    w(t) || F(x_t, t, c) - (c(t) x + d(t) z) ||^2, on batches (normalized latents (B, c, h, w), cond) of
    ``gmpipe.data.latents.make_batch_fn``."""

    def loss(batch, step, context, modules):
        latents, cond = batch
        cond = denoiser.drop_condition(cond, p_uncond)
        value = objective.loss(lambda x_t, t: modules[name](x_t, t, cond), latents).mean()
        return value, {"loss": value.detach()}

    return LossStep(name, denoiser, loss)
