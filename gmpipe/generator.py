"""One interface for every trained model, whatever its family: requests and per-sample seeds in, uint8 images and
the network evaluations spent out.

    generator = load_generator("models/ldm", autoencoder="models/vae")
    images, nfe = generator.generate([3, 3, 7], seeds=[0, 1, 2])   # uint8 (3, C, H, W), NFE per image

A request per sample is a class label (int), a prompt (str) or None; the model's conditioning turns them into
its condition (``gmpipe.conditioning``). Sample i depends only on seeds[i], requests[i] and the settings, never on
the batch it was drawn in, the batch size or the number of processes: every random draw of a sample comes from its
own stream (``gmpipe.seeds.SampleNoise``).

``settings`` are a model's own defaults (for latent diffusion: sampler, steps, guidance, the time grid's shift);
``generate(..., **settings)`` overrides some for one call, and a setting a model does not have is an error. Callers
ask a model what it has (``"guidance" in generator.settings``), never which family it is.

A model folder says which family it belongs to, and which stage writes it, in ``family.json``
(``{"family": "latent_diffusion", "stage": "train_ldm"}``); the families are registered by name in
``gmpipe.registry.MODEL_FAMILIES``. A family is a :class:`Generator` subclass with ``load``, ``generate`` and
``save``; adding one is its own module plus one registry line.

A family that defines a density may also answer ``likelihood`` (held-out images in, a :class:`Likelihood` out: its
negative log-likelihood, or a bound on it, in bits per dimension of the space it models, with the caveat that
comes with the number); the base class answers None. ``gmpipe.family_file.find_model_folders`` lists every model
folder under ``models/``, so callers discover models by their ``family.json``, never by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from gmpipe.artifacts import ArtifactError, read_json
from gmpipe.conditioning import Conditioning, Request
from gmpipe.errors import GmpipeError
from gmpipe.family_file import FAMILY_FILE, FamilyFile, write_family_file
from gmpipe.precision import bf16_autocast, resolve_precision
from gmpipe.registry import MODEL_FAMILIES

DEFAULT_BATCH_SIZE = 256
PRECISIONS = ("auto", "fp32", "bf16")


class Generated(NamedTuple):
    images: np.ndarray  # uint8 (N, C, H, W)
    nfe: int  # network evaluations per image


@dataclass(frozen=True)
class Likelihood:
    """A model's negative log-likelihood of held-out data (or an upper bound on it), lower is better.

    ``bits``: the mean over the ``n`` items of -log2 p(item) / dims, in ``unit`` ("bits/dim" or "bits/token") of
    ``space`` (what one dimension is: pixels, normalized latents, tokens; numbers in different spaces are not
    comparable). ``standard_error``: of that mean, across items (an estimator's own noise included, since each item
    carries its own draw). ``kind``: "exact", "upper bound" or "estimate". ``method``: how it was computed, in a
    few words. ``caveat``: what the number does not say. ``parts``: further figures (the terms of a bound, the same
    quantity in another space).
    """

    bits: float
    standard_error: float
    n: int
    unit: str
    space: str
    kind: str
    method: str
    caveat: str
    parts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_items(cls, bits_per_item: torch.Tensor, **described: Any) -> Likelihood:
        """The mean and its standard error over per-item values (N,) (0 for a single item)."""
        values = bits_per_item.detach().double().cpu()
        n = len(values)
        error = float(values.std() / math.sqrt(n)) if n > 1 else 0.0
        return cls(bits=float(values.mean()), standard_error=error, n=n, **described)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Generator:
    """A trained model that generates images (see the module docstring). Attributes: ``conditioning``,
    ``settings`` (the defaults ``generate`` uses), ``device`` and ``precision``: "fp32", or "bf16" to run the
    network evaluations of ``generate`` (sampling and decoding) under bfloat16 autocast (:meth:`autocast`; the
    samplers' state and the images stay float32), where a family finds it faster (the autoregressive prior decodes
    in bf16 but samples its tokens in float32). Likelihoods always run in float32."""

    conditioning: Conditioning
    settings: dict[str, Any]
    device: torch.device
    precision: str = "fp32"

    def autocast(self) -> torch.autocast:
        """The context every network evaluation of ``generate`` runs under: bfloat16 autocast on the model's device
        type with ``precision`` "bf16", else a disabled one."""
        return bf16_autocast(self.device, self.precision == "bf16")

    @classmethod
    def load(cls, folder: Path, stage: str, *, autoencoder: Path | None = None,
             device: torch.device | str = "cpu") -> Generator:
        """The model in ``folder`` (written by ``stage``), its networks on ``device``; ``autoencoder`` is the
        folder of the trained autoencoder, for families that generate in its latent space."""
        raise NotImplementedError

    def generate(self, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, **settings: Any) -> Generated:
        """``len(seeds)`` images, sample i for requests[i] (None: no request for any sample) from seeds[i]."""
        raise NotImplementedError

    def likelihood(self, images: np.ndarray, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Likelihood | None:
        """The model's negative log-likelihood of uint8 ``images`` (N, C, H, W) (held-out data), item i under
        requests[i] (its class, for conditional models) with any random draw from seeds[i]; None for a family
        that defines no density (the default)."""
        return None

    def use_decoder(self, decoder: torch.nn.Module | None) -> None:
        """Decode with ``decoder`` (a distilled small decoder, ``gmpipe.nn.small_decoder``) instead of the
        autoencoder's own (None: the autoencoder's again): only families that generate latents
        (:class:`LatentGenerator`) take one."""
        if decoder is None:
            return
        raise GmpipeError("this model generates images, not latents: it takes no small decoder (--decoder)")

    def resolve_settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The model's settings with ``overrides`` (None values ignored); a setting it does not have is an error."""
        unknown = sorted(set(overrides) - set(self.settings))
        if unknown:
            raise GmpipeError(f"this model has no setting {unknown[0]!r} (it has: {', '.join(sorted(self.settings))})")
        return {**self.settings, **{k: v for k, v in overrides.items() if v is not None}}

    @staticmethod
    def requests_for(requests: Sequence[Request] | None, seeds: Sequence[int]) -> list[Request]:
        """One request per seed (None for all when ``requests`` is None)."""
        if requests is None:
            return [None] * len(seeds)
        if len(requests) != len(seeds):
            raise ValueError(f"{len(requests)} requests but {len(seeds)} seeds: give one of each per sample")
        return list(requests)


class LatentGenerator(Generator):
    """A family that generates normalized latents in the autoencoder's space and decodes them. Attributes:
    ``stats`` (the latents' ``LatentStats``), ``autoencoder`` (decodes by default, and encodes where a family needs
    it), ``device``; ``small_decoder`` (None: the autoencoder decodes) is set by :meth:`use_decoder`."""

    stats: Any
    autoencoder: torch.nn.Module | None
    device: torch.device
    small_decoder: torch.nn.Module | None = None

    def use_decoder(self, decoder: torch.nn.Module | None) -> None:
        if decoder is None:
            self.small_decoder = None
            return
        channels = len(self.stats.shift)
        if decoder.latent_channels != channels:
            raise GmpipeError(f"the small decoder reads latents with {decoder.latent_channels} channels but this "
                              f"model generates {channels}; train it on this model's latents (train_decoder)")
        self.small_decoder = decoder.to(self.device).eval()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, c, h, w) -> images (B, C, H, W) in [-1, 1], on the CPU, by the small decoder when
        one is in use, else by the autoencoder."""
        from gmpipe.nn.autoencoder import decode_latents

        decoder = self.small_decoder if self.small_decoder is not None else self.autoencoder
        return decode_latents(decoder, self.stats.denormalize(latents), self.device)


def validated_settings(schema: type[BaseModel], settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` checked against a family's ``sampling.json`` model; the first problem is one GmpipeError line
    naming the setting (``temperature: Input should be greater than 0 (got 0.0)``)."""
    try:
        return schema.model_validate(dict(settings)).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        raise GmpipeError(f"{where}: {error['msg']} (got {error.get('input')!r})") from None


SAMPLING = "sampling.json"  # a model folder's sampling defaults (Generator.settings)
LATENT_STATS = "latent_stats.json"  # the latent statistics of a family that generates in the autoencoder's space


def write_latent_model_files(folder: Path, generator: Generator, stats, stage: str,
                             stats_file: Path | None = None) -> None:
    """What every latent-space family writes beside its networks: ``sampling.json``, the conditioning, the latent
    stats (``stats_file`` copied as written by cache_latents, else ``stats`` alone) and ``family.json``."""
    folder = Path(folder)
    (folder / SAMPLING).write_text(json.dumps(generator.settings, indent=2))
    generator.conditioning.save(folder)
    if stats_file is not None:
        (folder / LATENT_STATS).write_text(Path(stats_file).read_text())
    else:
        stats.save(folder / LATENT_STATS)
    write_family(folder, type(generator), stage)


def write_family(folder: Path, family: type[Generator], stage: str) -> None:
    """Record in ``folder`` which family its model belongs to and which stage writes it (``gmpipe.family_file``)."""
    write_family_file(folder, MODEL_FAMILIES.name_of(family), stage)


def load_generator(folder: str | Path, *, autoencoder: str | Path | None = None, decoder: str | Path | None = None,
                   device: torch.device | str = "cpu", missing_stage: str = "train_ldm",
                   precision: str = "fp32", precision_key: str = "precision") -> Generator:
    """The trained model in ``folder``, as its family loads it; ``decoder``: a small decoder folder
    (``models/decoder``) that decodes its latents instead of the autoencoder; ``precision``: of its network
    evaluations in ``generate`` (``Generator.precision``: ``auto`` resolved on ``device``,
    ``gmpipe.precision.resolve_precision``), a setting named ``precision_key`` (``evaluate.precision``) in the one
    warning line a ``bf16`` on hardware without it prints. ``missing_stage`` is the stage named when the folder holds
    no model at all (the one that would write it)."""
    if precision not in PRECISIONS:
        raise GmpipeError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    folder = Path(folder)
    if not (folder / FAMILY_FILE).is_file():
        raise ArtifactError(folder, f"no trained model here (no {FAMILY_FILE})", missing_stage, missing=True)
    described = read_json(folder / FAMILY_FILE, missing_stage, FamilyFile.model_validate)
    if described.family not in MODEL_FAMILIES:
        raise ArtifactError(folder / FAMILY_FILE, f"unknown model family {described.family!r} (this gmpipe knows "
                                                  f"{', '.join(MODEL_FAMILIES.names)})", described.stage)
    family = MODEL_FAMILIES[described.family]
    generator = family.load(folder, described.stage, autoencoder=Path(autoencoder) if autoencoder else None,
                            device=device)
    if decoder is not None:
        generator.use_decoder(load_decoder_for(decoder, autoencoder))
    generator.precision = resolve_precision(precision, device, precision_key)
    return generator


def load_decoder_for(decoder: str | Path, autoencoder: str | Path | None = None) -> torch.nn.Module:
    """The small decoder in ``decoder``, checked to be distilled from ``autoencoder`` when one is named
    (``gmpipe.decoder_folder``)."""
    from gmpipe.decoder_folder import load_small_decoder

    return load_small_decoder(decoder, autoencoder)[0]
