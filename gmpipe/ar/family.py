"""The autoregressive family: the causal LM over latent tokens, its tokenizer, the latent scale and shift, its
conditioning and sampling defaults, and the autoencoder that decodes its latents, as one :class:`Generator`.

``models/ar/`` (written by ``train_ar``) holds::

    family.json          {"family": "autoregressive", "stage": "train_ar"} (gmpipe.generator)
    lm/, ar.json         the causal LM (EMA weights, transformers format) and its token layout (gmpipe.ar.model)
    tokenizer.json       the scalar quantizer of the normalized latents (gmpipe.ar.tokenizer)
    sampling.json        default guidance weight w, temperature and top_k
    conditioning.json    class labels or none (gmpipe.conditioning)
    latent_stats.json    the latent shift and scale measured by cache_latents

Generation (Generator.generate): sample i draws its L tokens with the uniforms of its own seed (ancestral
sampling on the key/value cache, classifier-free guidance on the logits, temperature, top-k:
``gmpipe.ar.sampling``); the tokens become the bin centers of the normalized latents, which are denormalized and
decoded. NFE per image = L, 2 L when guided. A class-conditional model samples class y under the prefix of y; an
unconditional one (``conditioning: none``) was trained and samples under the null prefix alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gmpipe.ar.model import LatentAR
from gmpipe.ar.sampling import sample_latents
from gmpipe.ar.tokenizer import LatentTokenizer
from gmpipe.artifacts import ArtifactError, read_json
from gmpipe.batching import even_batches
from gmpipe.conditioning import Conditioning, Request
from gmpipe.config.base import built_for
from gmpipe.config.train_ar import AR_CONDITIONINGS
from gmpipe.data.latents import LatentStats
from gmpipe.errors import GmpipeError
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

STAGE = "train_ar"


class SamplingFile(BaseModel):
    """``sampling.json``: guidance weight w (logits (1 + w) l_y - w l_null), temperature > 0 and top_k (None: no
    cut)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    guidance: Annotated[float, Field(allow_inf_nan=False)]
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    top_k: Annotated[int, Field(ge=1)] | None


def check_conditioning(kind: str) -> None:
    """Refuse a conditioning the prior does not have (one line naming what it has)."""
    try:
        built_for(kind, "the autoregressive prior", AR_CONDITIONINGS)
    except ValueError as exc:
        raise GmpipeError(f"conditioning: {exc}") from None


def labels_for_model(model: LatentAR, cond: torch.Tensor | None, n: int) -> torch.Tensor:
    """The model's labels (n,) for a conditioning's batch: the class labels, or the null class for None."""
    return cond.long().cpu() if cond is not None else torch.full((n,), model.null_label, dtype=torch.long)


class AutoregressivePrior(LatentGenerator):
    """Settings: ``guidance`` (w; 0 for unconditional models), ``temperature`` and ``top_k``. Networks run on
    ``device``; inputs and outputs stay on the CPU."""

    def __init__(self, model: LatentAR, tokenizer: LatentTokenizer, stats: LatentStats, conditioning: Conditioning,
                 settings: dict[str, Any], autoencoder: torch.nn.Module | None = None,
                 device: torch.device | str = "cpu") -> None:
        check_conditioning(conditioning.kind)
        if tokenizer.bins != model.bins or tokenizer.sequence_length != model.sequence_length:
            raise ValueError(f"the tokenizer ({tokenizer.bins} bins, L = {tokenizer.sequence_length}) does not fit "
                             f"the model ({model.bins} bins, L = {model.sequence_length})")
        if conditioning.conditional and model.num_classes != len(conditioning.class_names):
            raise ValueError(f"the model has {model.num_classes} class prefixes for "
                             f"{len(conditioning.class_names)} classes")
        self.model = model
        self.tokenizer = tokenizer
        self.stats = stats
        self.conditioning = conditioning
        self.settings = self.checked_settings(settings)
        self.autoencoder = autoencoder
        self.device = torch.device(device)

    @property
    def sequence_length(self) -> int:
        """L: tokens per latent, one network evaluation each (two when guided)."""
        return self.model.sequence_length

    def checked_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``settings`` validated (one GmpipeError line naming the first bad one)."""
        checked = validated_settings(SamplingFile, settings)
        if checked["top_k"] is not None and checked["top_k"] > self.model.bins:
            raise GmpipeError(f"top_k: must be <= {self.model.bins}, the number of bins (got {checked['top_k']})")
        return checked

    @classmethod
    def load(cls, folder: Path, stage: str, *, autoencoder: Path | None = None,
             device: torch.device | str = "cpu") -> AutoregressivePrior:
        """The model in ``folder`` and, if given, the autoencoder; a missing or damaged file is one ArtifactError
        naming it and ``stage``."""
        folder, device = Path(folder), torch.device(device)
        conditioning = Conditioning.load(folder, stage)
        settings = read_json(folder / SAMPLING, stage, SamplingFile.model_validate).model_dump()
        stats = LatentStats.load(folder / LATENT_STATS, stage)
        tokenizer = LatentTokenizer.load(folder, stage)
        model = LatentAR.from_pretrained(folder, stage).to(device)
        decoder = load_autoencoder(autoencoder).to(device) if autoencoder is not None else None
        try:
            return cls(model, tokenizer, stats, conditioning, settings, decoder, device)
        except (ValueError, GmpipeError) as exc:
            raise ArtifactError(folder, str(exc), stage) from None

    def save(self, folder: Path, stage: str = STAGE, stats_file: Path | None = None) -> None:
        """Write the model folder (the layout above); ``stats_file`` is copied as ``latent_stats.json``."""
        folder = Path(folder)
        self.model.to("cpu").save_pretrained(folder)
        self.tokenizer.save(folder)
        write_latent_model_files(folder, self, self.stats, stage, stats_file)

    @torch.no_grad()
    def generate(self, requests: Sequence[Request] | None, seeds: Sequence[int], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, **settings: Any) -> Generated:
        if not seeds:
            raise ValueError("generate: give at least one seed")
        chosen = self.checked_settings(self.resolve_settings(settings))
        requests = self.requests_for(requests, seeds)
        labels = labels_for_model(self.model, self.conditioning.encode(requests), len(seeds))
        guidance = chosen["guidance"] if self.conditioning.conditional else 0.0
        images, nfe = [], 0
        for start, stop in even_batches(len(seeds), batch_size):
            # The token loop under the precision too: in bf16 its cached keys and values are half the bytes, and
            # attention reading them is most of each step (250 guided demo samples: 7.7-8.2 -> 4.9 s); the output
            # layer stays float32 (LatentAR.next_logits)
            with self.autocast():
                latents, nfe = sample_latents(self.model, self.tokenizer, labels[start:stop], list(seeds[start:stop]),
                                              guidance=guidance, temperature=chosen["temperature"],
                                              top_k=chosen["top_k"], batch_size=batch_size)
                images.append(signed_to_uint8(self.decode(latents)))
        return Generated(np.concatenate(images), nfe)
