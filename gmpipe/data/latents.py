"""Cached latents on disk, and the latent scale and shift measured on them.

Layout of ``data/latents/``::

    {train,val,test}.safetensors  mean, std (N, c, h, w) float32: the posterior q(z|x) = N(mean, std^2) of
                                  every prepared image (a fresh z is sampled at train time, so the posterior
                                  noise is not frozen); labels (N,) int64; caption_index (N,) int64
    texts.safetensors             states (U, L, D) float16 and mask (U, L) uint8 of the U distinct captions
    captions.json                 the U distinct captions, in index order
    stats.json                    per-channel shift and scale: the denoiser sees (z - shift) * scale

Every stage that touches latents reads the scale and shift from ``stats.json`` (copied next to each trained
denoiser); there is no magic constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATS = "stats.json"
TEXTS = "texts.safetensors"
CAPTIONS = "captions.json"


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
    def load(cls, path: Path) -> LatentStats:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the 'cache_latents' stage first")
        raw = json.loads(path.read_text())
        return cls(tuple(raw["shift"]), tuple(raw["scale"]))


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


def save_split(directory: Path, name: str, split: LatentSplit) -> None:
    save_file({"mean": split.mean.contiguous(), "std": split.std.contiguous(), "labels": split.labels.contiguous(),
               "caption_index": split.caption_index.contiguous()}, directory / f"{name}.safetensors")


def load_split(directory: str | Path, name: str) -> LatentSplit:
    file = Path(directory) / f"{name}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; run the 'cache_latents' stage first (gmpipe stage cache_latents)")
    tensors = load_file(file)
    return LatentSplit(tensors["mean"], tensors["std"], tensors["labels"], tensors["caption_index"])


def save_texts(directory: Path, captions: list[str], states: torch.Tensor, mask: torch.Tensor) -> None:
    save_file({"states": states.half().contiguous(), "mask": mask.to(torch.uint8).contiguous()}, directory / TEXTS)
    (directory / CAPTIONS).write_text(json.dumps(captions, indent=0))


def load_texts(directory: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(captions, states (U, L, D) float32, mask (U, L) bool)."""
    directory = Path(directory)
    if not (directory / TEXTS).is_file():
        raise FileNotFoundError(
            f"{directory / TEXTS}: missing; set cache_latents.text_encoder and rerun the 'cache_latents' stage"
        )
    tensors = load_file(directory / TEXTS)
    return json.loads((directory / CAPTIONS).read_text()), tensors["states"].float(), tensors["mask"].bool()
