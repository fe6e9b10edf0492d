"""A trained latent generative model as one object: denoiser + objective + latent stats + autoencoder.

``models/ldm/`` (written by ``train_ldm``) holds::

    denoiser/            the EMA weights, diffusers format (what sampling uses)
    denoiser_raw/        the last training weights, same format
    objective.json       the generalized objective it was trained with (schedule, target, time density, weighting)
    sampling.json        default sampler, steps, guidance weight and the time grid's resolution shift
    conditioning.json    mode, class names, text encoder source and max length
    latent_stats.json    the latent shift and scale measured by cache_latents (copied from data/latents/stats.json)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gmpipe.artifacts import read_json
from gmpipe.data.latents import LatentStats
from gmpipe.device import conditions_to_device
from gmpipe.diffusion import Objective, get_sampler, make_guided_model_fn
from gmpipe.errors import GmpipeError

OBJECTIVE = "objective.json"
SAMPLING = "sampling.json"
CONDITIONING = "conditioning.json"
LATENT_STATS = "latent_stats.json"
STUDENT_INFO = "student.json"


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
        resolve_sampler(name)
        return name


class ConditioningFile(BaseModel):
    """``conditioning.json``: what the denoiser is conditioned on (text models also name their encoder)."""

    model_config = ConfigDict(extra="allow", strict=True)
    mode: Literal["class", "text", "none"]
    class_names: list[str]
    text_encoder: str | None = None
    max_length: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _text_needs_encoder(self) -> ConditioningFile:
        if self.mode == "text" and (self.text_encoder is None or self.max_length is None):
            raise ValueError("a text-conditional model needs text_encoder and max_length")
        return self


def resolve_sampler(name: str):
    """A gmpipe.diffusion sampler by name, or the multistep consistency sampler of consistency students."""
    if name == "consistency":
        from gmpipe.distill.consistency import consistency_sample

        return consistency_sample
    return get_sampler(name)


def denoiser_fn(denoiser):
    """denoiser(x_t, t, cond) as the (x_t, t, cond) callable the guidance wrapper expects."""
    return lambda x_t, t, cond: denoiser(x_t, t, cond)


@dataclass
class LatentGenerator:
    denoiser: torch.nn.Module
    objective: Objective
    stats: LatentStats
    vae: torch.nn.Module | None
    conditioning: dict
    sampling: dict
    latent_shape: tuple[int, int, int]
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, model_dir: str | Path, vae_dir: str | Path | None = None, weights: str = "denoiser",
             device: torch.device | str = "cpu"):
        """Load ``models/ldm`` (or a student folder with the same layout) and, if given, the autoencoder, onto
        ``device`` (where the networks run; inputs and outputs stay on the CPU)."""
        from gmpipe.nn.denoiser import Denoiser

        model_dir = Path(model_dir)
        device = torch.device(device)
        if not (model_dir / OBJECTIVE).is_file():
            raise GmpipeError(f"{model_dir}: no trained denoiser here; run the 'train_ldm' stage first")
        stage = "distill" if (model_dir / STUDENT_INFO).is_file() else "train_ldm"  # the stage that rewrites it
        objective = read_json(model_dir / OBJECTIVE, stage, Objective.from_config)
        conditioning = read_json(model_dir / CONDITIONING, stage, ConditioningFile.model_validate)
        sampling = read_json(model_dir / SAMPLING, stage, SamplingFile.model_validate)
        stats = LatentStats.load(model_dir / LATENT_STATS, stage)
        denoiser = Denoiser.from_pretrained(model_dir / weights, stage).eval().to(device)
        vae = None
        if vae_dir is not None:
            from gmpipe.stages.cache_latents import load_vae

            vae = load_vae(Path(vae_dir)).to(device)
        return cls(
            denoiser=denoiser,
            objective=objective,
            stats=stats,
            vae=vae,
            conditioning=conditioning.model_dump(exclude_none=True),
            sampling=sampling.model_dump(),
            latent_shape=(denoiser.in_channels, denoiser.sample_size, denoiser.sample_size),
            device=device,
        )

    def condition(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None):
        """The denoiser's condition for class labels or text prompts (None for an unconditional model)."""
        mode = self.conditioning["mode"]
        if mode == "class":
            if labels is None:
                raise GmpipeError("this model is class-conditional: give class labels")
            n_classes = len(self.conditioning["class_names"])
            bad = [label for label in labels if not 0 <= label < n_classes]
            if bad:
                raise GmpipeError(f"class labels {bad} out of range 0..{n_classes - 1}")
            return torch.tensor(list(labels), dtype=torch.long)
        if mode == "text":
            if prompts is None:
                raise GmpipeError("this model is text-conditional: give prompts")
            from gmpipe.nn.text_encoder import TextEncoder

            encoder = TextEncoder(self.conditioning["text_encoder"], max_length=self.conditioning["max_length"],
                                  device=self.device)
            return encoder.encode(list(prompts))
        return None

    @torch.no_grad()
    def sample_latents(self, cond, n: int, sampler: str | None = None, steps: int | None = None,
                       guidance: float | None = None, seed: int = 0, batch_size: int = 256,
                       shift: float | None = None) -> tuple[torch.Tensor, int]:
        """Normalized latents (n, c, h, w) on the CPU and the NFE per sample. ``cond`` has batch n (or is None).

        Unset arguments take the model's stored defaults (``sampling.json``); ``shift`` is the resolution shift of
        the time grid the model was trained (or distilled) on, 1 for models saved before it was stored. Noise comes
        from a CPU generator seeded with ``seed``, so the samples do not depend on the device.
        """
        sampler = resolve_sampler(sampler or self.sampling["sampler"])
        steps = steps or self.sampling["steps"]
        shift = self.sampling.get("shift", 1.0) if shift is None else shift
        w = self.sampling["guidance"] if guidance is None else guidance
        if self.conditioning["mode"] == "none":
            w = 0.0
        generator = torch.Generator().manual_seed(seed)
        chunks, nfe = [], 0
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            chunk_cond = conditions_to_device(_slice(cond, start, start + size), self.device)
            noise = torch.randn((size, *self.latent_shape), generator=generator).to(self.device)
            null = self.denoiser.null_condition(size, like=chunk_cond)
            model_fn = make_guided_model_fn(denoiser_fn(self.denoiser), chunk_cond, null, w)
            latents, nfe = sampler(model_fn, self.objective, noise, steps, shift=shift, generator=generator)
            chunks.append(latents.cpu())
        return torch.cat(chunks), nfe

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Normalized latents -> images (n, C, H, W) in [-1, 1], on the CPU."""
        if self.vae is None:
            raise GmpipeError("no autoencoder loaded: pass vae_dir to LatentGenerator.load")
        images = []
        for start in range(0, len(latents), batch_size):
            z = self.stats.denormalize(latents[start : start + batch_size]).to(self.device)
            images.append(self.vae.decode(z).sample.clamp(-1, 1).cpu())
        return torch.cat(images)


def _slice(cond, start: int, stop: int):
    if cond is None:
        return None
    if isinstance(cond, tuple):
        return tuple(c[start:stop] for c in cond)
    return cond[start:stop]


def save_model_bundle(directory: Path, objective: Objective, stats_file: Path, conditioning: dict,
                      sampling: dict) -> None:
    """The JSON files next to the weights that make a model folder self-contained."""
    (directory / OBJECTIVE).write_text(json.dumps(objective.to_config(), indent=2))
    (directory / SAMPLING).write_text(json.dumps(sampling, indent=2))
    (directory / CONDITIONING).write_text(json.dumps(conditioning, indent=2))
    (directory / LATENT_STATS).write_text(stats_file.read_text())
