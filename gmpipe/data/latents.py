"""Cached latents on disk, and the latent scale and shift measured on them.

Layout of ``data/latents/``::

    {train,val,test}.safetensors  mean, std (N, c, h, w) float32: the posterior q(z|x) = N(mean, std^2) of
                                  every prepared image (a fresh z is sampled at train time, so the posterior
                                  noise is not frozen); labels (N,) int64; caption_index (N,) int64
    texts.safetensors             states (U, L, D) float16 and mask (U, L) uint8 of the U distinct captions
    captions.json                 the U distinct captions, in index order
    text_encoder.json             the text encoder that embedded them and its max length
    stats.json                    per-channel shift and scale: the denoiser sees (z - shift) * scale

Every stage that touches latents reads the scale and shift from ``stats.json`` (copied next to each trained
denoiser); there is no magic constant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save_file

from gmpipe.artifacts import ArtifactError, read_json, read_safetensors
from gmpipe.batching import to_device
from gmpipe.device import transfer

STATS = "stats.json"
TEXTS = "texts.safetensors"
CAPTIONS = "captions.json"
TEXT_ENCODER = "text_encoder.json"
STAGE = "cache_latents"


class StatsFile(BaseModel):
    """``stats.json`` (and the ``latent_stats.json`` copy in every model folder): finite shifts, positive scales."""

    model_config = ConfigDict(extra="allow", strict=True)
    shift: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1)]
    scale: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)]

    @model_validator(mode="after")
    def _same_channels(self) -> StatsFile:
        if len(self.shift) != len(self.scale):
            raise ValueError(f"{len(self.shift)} shifts but {len(self.scale)} scales")
        return self


class TextEncoderFile(BaseModel):
    """``text_encoder.json``: which encoder embedded the captions, and at what length."""

    model_config = ConfigDict(extra="allow", strict=True)
    text_encoder: str
    max_length: Annotated[int, Field(ge=1)]


@dataclass(frozen=True)
class LatentStats:
    """Per-channel affine normalisation of latents: normalized = (z - shift) * scale, shapes (c,)."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def _view(self, values, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.ndim - 2)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self._view(self.scale, latents) + self._view(self.shift, latents)

    @classmethod
    def measure(cls, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> LatentStats:
        """Shift and scale of sampled latents z = mean + std * eps, per channel, over (N, h, w)."""
        z = mean + std * torch.randn(mean.shape, generator=generator)
        dims = [0, *range(2, z.ndim)]
        channel_std = z.double().std(dim=dims).clamp_min(1e-8)
        return cls(tuple(z.double().mean(dim=dims).tolist()), tuple((1.0 / channel_std).tolist()))

    def save(self, path: Path, **extra) -> None:
        path.write_text(json.dumps({"shift": list(self.shift), "scale": list(self.scale), **extra}, indent=2))

    @classmethod
    def load(cls, path: Path, stage: str = STAGE) -> LatentStats:
        """Read and check a stats file; ``stage`` is the one that writes it (a model folder's copy: its stage)."""
        raw = read_json(path, stage, StatsFile.model_validate)
        return cls(tuple(raw.shift), tuple(raw.scale))


@dataclass(frozen=True)
class LatentSplit:
    mean: torch.Tensor  # (N, c, h, w)
    std: torch.Tensor  # (N, c, h, w)
    labels: torch.Tensor  # (N,)
    caption_index: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh posterior sample z = mean + std * eps for the items ``index``."""
        mean, std = self.mean[index], self.std[index]
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)

    def subset(self, n: int | None, seed: int = 0) -> LatentSplit:
        """n items chosen by a permutation seeded with ``seed``, kept in their stored order (all for None or
        n >= N): a fixed evaluation set that does not depend on how the split happens to be sorted."""
        if n is None or n >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return LatentSplit(self.mean[index], self.std[index], self.labels[index], self.caption_index[index])


def make_batch_fn(split: LatentSplit, stats: LatentStats,
                  conditions: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor, torch.device | str], tuple]:
    """index (B,) -> (normalized posterior sample (B, c, h, w), the items' condition batch) on a device: the batch
    of latent diffusion training. z is drawn fresh every time; ``conditions`` is the conditioning's
    ``training_conditions`` (index -> cond)."""

    def make_batch(index: torch.Tensor, device: torch.device | str) -> tuple:
        latents = transfer(stats.normalize(split.sample(index)), device)
        return latents, to_device(conditions(index), device, move=transfer)

    return make_batch


def save_split(directory: Path, name: str, split: LatentSplit) -> None:
    save_file({"mean": split.mean.contiguous(), "std": split.std.contiguous(), "labels": split.labels.contiguous(),
               "caption_index": split.caption_index.contiguous()}, directory / f"{name}.safetensors")


def load_split(directory: str | Path, name: str) -> LatentSplit:
    file = Path(directory) / f"{name}.safetensors"
    tensors = read_safetensors(file, STAGE, ("mean", "std", "labels", "caption_index"))
    mean, std, labels, index = (tensors[k] for k in ("mean", "std", "labels", "caption_index"))
    if mean.ndim != 4 or std.shape != mean.shape or labels.shape != (len(mean),) or index.shape != labels.shape:
        raise ArtifactError(file, f"inconsistent shapes (mean {tuple(mean.shape)}, std {tuple(std.shape)}, "
                                  f"labels {tuple(labels.shape)}, caption_index {tuple(index.shape)})", STAGE)
    return LatentSplit(mean, std, labels, index)


def save_texts(directory: Path, captions: list[str], states: torch.Tensor, mask: torch.Tensor, text_encoder: str,
               max_length: int) -> None:
    """The caption embeddings, the captions in index order, and which encoder made them (``text_encoder.json``)."""
    save_file({"states": states.half().contiguous(), "mask": mask.to(torch.uint8).contiguous()}, directory / TEXTS)
    (directory / CAPTIONS).write_text(json.dumps(captions, indent=0))
    encoder = {"text_encoder": text_encoder, "max_length": max_length}
    (directory / TEXT_ENCODER).write_text(json.dumps(encoder, indent=2))


def load_texts(directory: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(captions, states (U, L, D) float32, mask (U, L) bool)."""
    directory = Path(directory)
    if not (directory / TEXTS).is_file():
        raise ArtifactError(directory / TEXTS, "missing; set cache_latents.text_encoder", STAGE, missing=True)
    tensors = read_safetensors(directory / TEXTS, STAGE, ("states", "mask"))
    states, mask = tensors["states"], tensors["mask"]
    captions = read_json(directory / CAPTIONS, STAGE, expect=list)
    if not all(isinstance(caption, str) for caption in captions):
        raise ArtifactError(directory / CAPTIONS, "expected a JSON list of strings", STAGE)
    if states.ndim != 3 or mask.shape != states.shape[:2] or len(captions) != len(states):
        raise ArtifactError(directory / TEXTS, f"{len(captions)} captions but states {tuple(states.shape)} and "
                                               f"mask {tuple(mask.shape)}", STAGE)
    return captions, states.float(), mask.bool()


def load_text_encoder_info(directory: str | Path) -> dict:
    """``text_encoder.json``: {"text_encoder": source, "max_length": L}."""
    return read_json(Path(directory) / TEXT_ENCODER, STAGE, TextEncoderFile.model_validate).model_dump()
