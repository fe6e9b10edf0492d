"""Network sizes as small preset registries, one per model family (``train_ldm.preset``, ``train_ar.preset``,
``train_gan.preset`` name one). Plain data, importable without torch, so params are checked against these names
before any network is built."""

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
    # A CPU teacher one step up: ~2.2x the step time of small; FD 415.6 vs 449.2 at 1,000 steps on the demo (README).
    "medium": DenoiserPreset(width=192, depth=6, heads=6, patch_size=2),
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


@dataclass(frozen=True)
class ARPreset:
    """Transformer sizes of the autoregressive prior: width (embedding size, = heads * head_dim), layers (blocks),
    heads."""

    width: int
    layers: int
    heads: int

    def __post_init__(self) -> None:
        if min(self.width, self.layers, self.heads) < 1:
            raise ValueError(f"autoregressive model sizes must be positive, got {self}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


AR_PRESETS: dict[str, ARPreset] = {
    # Tests only: tens of thousands of parameters.
    "tiny": ARPreset(width=32, layers=2, heads=2),
    # CPU demos and smoke runs: about 0.8M parameters at L = 256.
    "small": ARPreset(width=128, layers=4, heads=4),
    # GPU runs.
    "base": ARPreset(width=384, layers=8, heads=6),
}


def get_ar_preset(preset: str | ARPreset) -> ARPreset:
    """A preset object, or the one registered under that name in ``AR_PRESETS``."""
    if isinstance(preset, ARPreset):
        return preset
    if preset not in AR_PRESETS:
        raise KeyError(f"unknown autoregressive preset {preset!r}; choose one of {sorted(AR_PRESETS)}")
    return AR_PRESETS[preset]


@dataclass(frozen=True)
class GANPreset:
    """Sizes of the latent GAN (``gmpipe.gan``): the generator's noise dimension d_z, class embedding dimension d_y
    and width, and the discriminator's width."""

    z_dim: int
    embed_dim: int
    width: int
    disc_width: int

    def __post_init__(self) -> None:
        if min(self.z_dim, self.embed_dim, self.width, self.disc_width) < 1:
            raise ValueError(f"GAN sizes must be positive, got {self}")


GAN_PRESETS: dict[str, GANPreset] = {
    # Tests only: a few thousand parameters per network.
    "tiny": GANPreset(z_dim=16, embed_dim=8, width=16, disc_width=16),
    # CPU demos: about 0.3M parameters per network on 4x8x8 latents with 10 classes.
    "small": GANPreset(z_dim=64, embed_dim=32, width=64, disc_width=64),
    # GPU runs.
    "base": GANPreset(z_dim=128, embed_dim=64, width=128, disc_width=128),
}


def get_gan_preset(preset: str | GANPreset) -> GANPreset:
    """A preset object, or the one registered under that name in ``GAN_PRESETS``."""
    if isinstance(preset, GANPreset):
        return preset
    if preset not in GAN_PRESETS:
        raise KeyError(f"unknown GAN preset {preset!r}; choose one of {sorted(GAN_PRESETS)}")
    return GAN_PRESETS[preset]
