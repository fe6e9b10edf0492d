"""A class-conditional convolutional generator G(z, y) -> normalized latent (DC-GAN-style, Radford et al. 2016,
with BigGAN-style class-conditional normalization, Brock et al. 2019).

Shapes, for latents (c, h, w), noise dimension d_z, class embedding dimension d_y and width C:

    z (B, d_z), y (B,) int64 in [0, n_classes)
    e = [z, embed(y)]                              (B, d_z + d_y)   (just z when n_classes = 0: unconditional)
    linear(e) -> (B, C, h_0, w_0)                   h_0 = h / 2**L, w_0 = w / 2**L   (see ``resolution_levels``)
    L + 1 residual blocks, a 2x nearest upsampling before each but the first     -> (B, C, h, w)
    GroupNorm, LeakyReLU(0.2), conv 3x3 (C -> c)   -> normalized latent (B, c, h, w)

Each residual block is  x + conv(act(cnorm(conv(act(cnorm(x, e))), e)))  with cnorm(x, e) = (1 + gamma(e)) *
GroupNorm(x) + beta(e), gamma and beta linear in e, so the class (and z) modulate every resolution. There is no
batch normalization: a sample depends only on its own z and y, never on the rest of the batch, which is what
per-sample seeds (``gmpipe.gan.sampling``) rely on. There is no output squashing either: normalized latents are
roughly unit-variance and unbounded.

The defaults (d_z 64, d_y 32, C 64) give 299k parameters for (4, 8, 8) latents and 10 classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gmpipe.gan.saving import SavedNetwork

_MIN_BASE_RESOLUTION = 4


def resolution_levels(height: int, width: int) -> list[tuple[int, int]]:
    """The spatial sizes of the networks' levels, coarsest first: (h, w) halved while both sides stay even and
    above 4, so (8, 8) -> [(4, 4), (8, 8)], (16, 16) -> [(4, 4), (8, 8), (16, 16)], (4, 4) or (1, 1) -> one level."""
    levels = [(height, width)]
    while all(side % 2 == 0 and side > _MIN_BASE_RESOLUTION for side in levels[0]):
        levels.insert(0, (levels[0][0] // 2, levels[0][1] // 2))
    return levels


def check_latent_shape(latent_shape) -> tuple[int, int, int]:
    """(c, h, w) as ints, each >= 1, or a ValueError."""
    shape = tuple(int(side) for side in latent_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"latent_shape must be (c, h, w) with every side >= 1, got {tuple(latent_shape)}")
    return shape


def check_sizes(**bounds: tuple[int, int]) -> None:
    """A ValueError naming the first size below its lower bound: ``name=(value, lowest allowed)``."""
    for name, (value, lowest) in bounds.items():
        if value < lowest:
            raise ValueError(f"{name} must be >= {lowest}, got {value}")


def _group_norm(channels: int, max_groups: int, affine: bool = True) -> nn.GroupNorm:
    # the largest group count <= max_groups that divides the width
    return nn.GroupNorm(math.gcd(channels, max_groups), channels, affine=affine)


class ConditionalNorm(nn.Module):
    """(1 + gamma(e)) * GroupNorm(x) + beta(e): x (B, C, H, W), e (B, E) -> (B, C, H, W). gamma and beta start at
    0 (an identity modulation), so a fresh block behaves like a plain normalized one."""

    def __init__(self, channels: int, cond_dim: int, max_groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, max_groups, affine=False)
        self.modulation = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(e)[:, :, None, None].chunk(2, dim=1)
        return (1 + gamma) * self.norm(x) + beta


class GeneratorBlock(nn.Module):
    """Residual block x + conv(act(cnorm(conv(act(cnorm(x, e))), e))): (B, C, H, W), (B, E) -> (B, C, H, W)."""

    def __init__(self, channels: int, cond_dim: int, max_groups: int) -> None:
        super().__init__()
        self.norm1 = ConditionalNorm(channels, cond_dim, max_groups)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = ConditionalNorm(channels, cond_dim, max_groups)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x, e)))
        return x + self.conv2(self.act(self.norm2(h, e)))


class ConditionalGenerator(SavedNetwork):
    """G(z, y): noise (B, z_dim) and class labels (B,) -> normalized latents (B, c, h, w) (see the module
    docstring for the layout).

    Args:
        latent_shape: (c, h, w) of the normalized latents it generates.
        n_classes: number of classes; 0 makes it unconditional (``labels`` must then be None).
        z_dim: dimension d_z of the Gaussian noise z ~ N(0, I).
        embed_dim: dimension d_y of the learned class embedding (unused when unconditional).
        width: channels C at every level.
        norm_groups: upper bound on the GroupNorm group count.
    """

    role = "GAN generator"

    def __init__(self, latent_shape: tuple[int, int, int] = (4, 8, 8), n_classes: int = 10, z_dim: int = 64,
                 embed_dim: int = 32, width: int = 64, norm_groups: int = 8) -> None:
        super().__init__()
        channels, height, width_px = check_latent_shape(latent_shape)
        check_sizes(n_classes=(n_classes, 0), z_dim=(z_dim, 1), embed_dim=(embed_dim, 1), width=(width, 1),
                    norm_groups=(norm_groups, 1))
        self.latent_shape = (channels, height, width_px)
        self.n_classes, self.z_dim, self.embed_dim, self.width, self.norm_groups = (
            n_classes, z_dim, embed_dim, width, norm_groups)
        self.levels = resolution_levels(height, width_px)
        cond_dim = z_dim + (embed_dim if n_classes else 0)
        self.embed = nn.Embedding(n_classes, embed_dim) if n_classes else None
        base_h, base_w = self.levels[0]
        self.input = nn.Linear(cond_dim, width * base_h * base_w)
        self.blocks = nn.ModuleList(GeneratorBlock(width, cond_dim, norm_groups) for _ in self.levels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.out_norm = _group_norm(width, norm_groups)
        self.out = nn.Conv2d(width, channels, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def to_config(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "n_classes": self.n_classes, "z_dim": self.z_dim,
                "embed_dim": self.embed_dim, "width": self.width, "norm_groups": self.norm_groups}

    def condition_vector(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """e = [z, embed(y)] (B, d_z + d_y), or z alone for an unconditional generator."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (B, {self.z_dim}), got {tuple(z.shape)}")
        if self.embed is None:
            if labels is not None:
                raise ValueError("this generator is unconditional: pass labels=None")
            return z
        if labels is None or labels.shape != (z.shape[0],):
            raise ValueError(f"this generator is class-conditional: labels must have shape ({z.shape[0]},)")
        return torch.cat([z, self.embed(labels)], dim=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, z_dim), labels (B,) int64 (None when unconditional) -> normalized latents (B, c, h, w)."""
        e = self.condition_vector(z, labels)
        base_h, base_w = self.levels[0]
        x = self.input(e).view(-1, self.width, base_h, base_w)
        for index, block in enumerate(self.blocks):
            if index:
                x = self.upsample(x)
            x = block(x, e)
        return self.out(self.act(self.out_norm(x)))
