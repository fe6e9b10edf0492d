"""A class-conditional projection discriminator on latents (Miyato & Koyama 2018, "cGANs with Projection
Discriminator", eq. 3):

    D(x, y) = psi(phi(x)) + embed(y)^T phi(x)

phi is a residual convolutional feature extractor followed by global sum pooling, psi a linear layer and
embed(y) a learned vector per class: the class enters as an inner product with the features rather than as an
input channel, which is what makes the logit the log density ratio of a class-conditional model.

Shapes, for latents (c, h, w), width C and levels (h_k, w_k) from ``resolution_levels(h, w)`` (finest first
here, L + 1 of them):

    x (B, c, h, w) -> conv 3x3 (c -> C)
    level k = 0 .. L: residual block (C_{k-1} -> C_k) at (h_k, w_k), then 2x2 average pooling except at the
        coarsest level; C_k = C * min(2**k, 4), C_{-1} = C
    LeakyReLU(0.2), sum over positions                      phi(x) (B, C_L)
    logits = psi(phi) + <embed(y), phi>                     (B,)

No normalization layers (R1 penalizes per-sample input gradients; batch statistics would couple samples);
``spectral_norm=True`` wraps every weight in spectral normalization (Miyato et al. 2018) instead. The defaults
(C 64) give 307k parameters for (4, 8, 8) latents and 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as spectral_normalized

from gmpipe.gan.generator import check_latent_shape, check_sizes, resolution_levels
from gmpipe.gan.saving import SavedNetwork

_MAX_WIDTH_MULTIPLIER = 4


class DiscriminatorBlock(nn.Module):
    """conv(act(conv(act(x)))) + skip(x): (B, C_in, H, W) -> (B, C_out, H, W); skip is a 1x1 conv when the
    width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act(self.conv1(self.act(x))))
        return h + (x if self.skip is None else self.skip(x))


class ProjectionDiscriminator(SavedNetwork):
    """D(x, y): normalized latents (B, c, h, w) and class labels (B,) -> real/fake logits (B,) (see the module
    docstring).

    Args:
        latent_shape: (c, h, w) of the latents it judges.
        n_classes: number of classes; 0 makes it unconditional (no projection term, ``labels`` must be None).
        width: channels C of the finest level; each coarser level doubles it, capped at 4 C.
        spectral_norm: wrap every weight (convs, psi, the class embedding) in spectral normalization.
    """

    role = "GAN discriminator"

    def __init__(self, latent_shape: tuple[int, int, int] = (4, 8, 8), n_classes: int = 10, width: int = 64,
                 spectral_norm: bool = False) -> None:
        super().__init__()
        channels, height, width_px = check_latent_shape(latent_shape)
        check_sizes(n_classes=(n_classes, 0), width=(width, 1))
        self.latent_shape = (channels, height, width_px)
        self.n_classes, self.width, self.spectral_norm = n_classes, width, bool(spectral_norm)
        levels = resolution_levels(height, width_px)
        widths = [width] + [width * min(2**k, _MAX_WIDTH_MULTIPLIER) for k in range(len(levels))]
        self.input = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(DiscriminatorBlock(widths[k], widths[k + 1]) for k in range(len(levels)))
        self.feature_dim = widths[-1]
        self.psi = nn.Linear(self.feature_dim, 1)
        self.embed = nn.Embedding(n_classes, self.feature_dim) if n_classes else None
        self.act = nn.LeakyReLU(0.2)
        if self.spectral_norm:
            for module in list(self.modules()):
                if isinstance(module, nn.Conv2d | nn.Linear | nn.Embedding):
                    spectral_normalized(module)

    def to_config(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "n_classes": self.n_classes, "width": self.width,
                "spectral_norm": self.spectral_norm}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, c, h, w) -> (B, feature_dim), sum-pooled over positions."""
        if x.shape[1:] != self.latent_shape:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(x.shape)}")
        h = self.input(x)
        for index, block in enumerate(self.blocks):
            h = block(h)
            if index < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        return self.act(h).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, c, h, w), labels (B,) int64 (None when unconditional) -> logits (B,)."""
        phi = self.features(x)
        logits = self.psi(phi).squeeze(1)
        if self.embed is None:
            if labels is not None:
                raise ValueError("this discriminator is unconditional: pass labels=None")
            return logits
        if labels is None or labels.shape != (x.shape[0],):
            raise ValueError(f"this discriminator is class-conditional: labels must have shape ({x.shape[0]},)")
        return logits + (self.embed(labels) * phi).sum(dim=1)
