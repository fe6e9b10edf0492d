"""The latent GAN family: the generator G(z, y) (its EMA weights), the latent scale and shift, its conditioning and
sampling default, and the autoencoder that decodes its latents, as one :class:`Generator`.

``models/gan/`` (written by ``train_gan``) holds::

    family.json          {"family": "latent_gan", "stage": "train_gan"} (gmpipe.generator)
    generator/           G's EMA weights and sizes (config.json, model.safetensors: gmpipe.gan.saving)
    sampling.json        the default truncation psi (1: none)
    conditioning.json    class labels or none (gmpipe.conditioning)
    latent_stats.json    the latent shift and scale measured by cache_latents

Generation (Generator.generate): sample i is G(psi z_i, y_i) with z_i ~ N(0, I) from its own seed
(``gmpipe.gan.sampling``), denormalized and decoded: one network evaluation per image (NFE = 1), like a one-step
distilled student.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gmpipe.artifacts import ArtifactError, read_json
from gmpipe.batching import even_batches
from gmpipe.conditioning import Conditioning, Request
from gmpipe.config.base import built_for
from gmpipe.config.train_gan import GAN_CONDITIONINGS
from gmpipe.data.latents import LatentStats
from gmpipe.errors import GmpipeError
from gmpipe.gan.generator import ConditionalGenerator
from gmpipe.gan.sampling import sample_latents
from gmpipe.generator import (
    DEFAULT_BATCH_SIZE,
    LATENT_STATS,
    SAMPLING,
    Generated,
    LatentGenerator,
    validated_settings,
    write_latent_model_files,
)
from gmpipe.nn.autoencoder import load_autoencoder
from gmpipe.pixels import signed_to_uint8

STAGE = "train_gan"
WEIGHTS = "generator"


class SamplingFile(BaseModel):
    """``sampling.json``: the truncation psi >= 0 (z -> psi z; 1 samples the training prior)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    truncation: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]


def check_conditioning(kind: str) -> None:
    """Refuse a conditioning the GAN does not have (one line naming what it has)."""
    try:
        built_for(kind, "the latent GAN", GAN_CONDITIONINGS)
    except ValueError as exc:
        raise GmpipeError(f"conditioning: {exc}") from None


def classes_of(conditioning: Conditioning) -> int:
    """The generator's ``n_classes`` for a conditioning: the class count, or 0 (unconditional)."""
    check_conditioning(conditioning.kind)
    return len(conditioning.class_names) if conditioning.conditional else 0


class LatentGAN(LatentGenerator):
    """Settings: ``truncation`` (psi). Networks run on ``device``; inputs and outputs stay on the CPU."""

    def __init__(self, generator: ConditionalGenerator, stats: LatentStats, conditioning: Conditioning,
                 settings: dict[str, Any], autoencoder: torch.nn.Module | None = None,
                 device: torch.device | str = "cpu") -> None:
        if generator.n_classes != classes_of(conditioning):
            raise ValueError(f"the generator has {generator.n_classes} classes; its conditioning "
                             f"{conditioning.kind!r} needs {classes_of(conditioning)}")
        self.generator = generator
        self.stats = stats
        self.conditioning = conditioning
        self.settings = validated_settings(SamplingFile, settings)
        self.autoencoder = autoencoder
        self.device = torch.device(device)

    @classmethod
    def load(cls, folder: Path, stage: str, *, autoencoder: Path | None = None,
             device: torch.device | str = "cpu") -> LatentGAN:
        """The model in ``folder`` and, if given, the autoencoder; a missing or damaged file is one ArtifactError
        naming it and ``stage``."""
        folder, device = Path(folder), torch.device(device)
        conditioning = Conditioning.load(folder, stage)
        settings = read_json(folder / SAMPLING, stage, SamplingFile.model_validate).model_dump()
        stats = LatentStats.load(folder / LATENT_STATS, stage)
        generator = ConditionalGenerator.from_pretrained(folder / WEIGHTS, stage).to(device)
        decoder = load_autoencoder(autoencoder).to(device) if autoencoder is not None else None
        try:
            return cls(generator, stats, conditioning, settings, decoder, device)
        except (ValueError, GmpipeError) as exc:
            raise ArtifactError(folder, str(exc), stage) from None

    def save(self, folder: Path, stage: str = STAGE, stats_file: Path | None = None) -> None:
        """Write the model folder (the layout above); ``stats_file`` is copied as ``latent_stats.json``."""
        folder = Path(folder)
        self.generator.to("cpu").save_pretrained(folder / WEIGHTS)
        write_latent_model_files(folder, self, self.stats, stage, stats_file)

    @torch.no_grad()
    def generate(self, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, **settings: Any) -> Generated:
        if not seeds:
            raise ValueError("generate: give at least one seed")
        chosen = validated_settings(SamplingFile, self.resolve_settings(settings))
        requests = self.requests_for(requests, seeds)
        labels = self.conditioning.encode(requests)  # (n,) class labels, or None
        images, nfe = [], 0
        for start, stop in even_batches(len(seeds), batch_size):
            with self.autocast():
                latents, nfe = sample_latents(self.generator, None if labels is None else labels[start:stop],
                                              list(seeds[start:stop]), batch_size, chosen["truncation"])
                images.append(signed_to_uint8(self.decode(latents.float())))
        return Generated(np.concatenate(images), nfe)
