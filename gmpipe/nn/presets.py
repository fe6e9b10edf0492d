"""Denoiser sizes as a small preset registry (``train_ldm.preset`` names one). Plain data, importable without torch,
so params are checked against these names before any network is built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DenoiserPreset:
    """Transformer sizes: token width, number of blocks, attention heads (width = heads * head_dim) and the
    patch size in latent pixels (a h x w latent becomes (h / patch_size) * (w / patch_size) tokens)."""

    width: int
    depth: int
    heads: int
    patch_size: int

    def __post_init__(self) -> None:
        if min(self.width, self.depth, self.heads, self.patch_size) < 1:
            raise ValueError(f"denoiser sizes must be positive, got {self}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads} (width = heads * head_dim)")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


DENOISER_PRESETS: dict[str, DenoiserPreset] = {
    # Tests only: a few tens of thousands of parameters.
    "tiny": DenoiserPreset(width=32, depth=2, heads=2, patch_size=2),
    # CPU demos and smoke runs: about 1.4M parameters as a class-conditional DiT on 4x8x8 latents.
    "small": DenoiserPreset(width=128, depth=4, heads=4, patch_size=2),
    # GPU runs: DiT-S width and depth (about 35M parameters with class labels).
    "base": DenoiserPreset(width=384, depth=12, heads=6, patch_size=2),
}


def get_denoiser_preset(preset: str | DenoiserPreset) -> DenoiserPreset:
    """A preset object, or the one registered under that name in ``DENOISER_PRESETS``."""
    if isinstance(preset, DenoiserPreset):
        return preset
    if preset not in DENOISER_PRESETS:
        raise KeyError(f"unknown denoiser preset {preset!r}; choose one of {sorted(DENOISER_PRESETS)}")
    return DENOISER_PRESETS[preset]
