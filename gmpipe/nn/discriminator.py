"""A PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", section 3.2.2).

Instead of one real/fake logit per image, a fully convolutional stack classifies every overlapping patch, so the
adversarial loss judges local texture and sharpness while the reconstruction loss keeps the low frequencies.

Layout, for ``n_layers`` = L and kernel 4 throughout:

    conv stride 2 (C -> w), LeakyReLU(0.2)                                   no norm on the image itself
    L - 1 times: conv stride 2 (-> w * min(2**i, 8)), norm, LeakyReLU(0.2)    i = 1 .. L-1
    conv stride 1 (-> w * min(2**L, 8)), norm, LeakyReLU(0.2)
    conv stride 1 (-> 1)                                                      logits, no activation

A (B, C, H, W) image gives (B, 1, h, w) logits with h = H / 2**L - 2 for H divisible by 2**L
(32x32 and L = 3: 2x2 patches; 28x28 and L = 2: 5x5 patches). Each layer with stride 2 and padding 1 maps
n -> floor(n / 2), each stride-1 conv n -> n - 1; the input must leave h, w >= 1.

The norm is GroupNorm rather than pix2pix's BatchNorm: autoencoder batches on a CPU are small, and BatchNorm
statistics would also mix real and fake images when both go through one batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_MAX_WIDTH_MULTIPLIER = 8


def _normalization(kind: str, channels: int, max_groups: int) -> nn.Module:
    if kind == "group":
        # The largest group count <= max_groups that divides the width.
        return nn.GroupNorm(math.gcd(channels, max_groups), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}; choose 'group' or 'none'")


class PatchDiscriminator(nn.Module):
    """Patch discriminator: images (B, in_channels, H, W) in [-1, 1] -> real/fake logits (B, 1, h, w).

    Args:
        in_channels: image channels C.
        width: channels w of the first conv; later layers double it, capped at 8 w.
        n_layers: number of stride-2 convs L; the receptive field grows with L (70x70 pixels for L = 3).
        norm: "group" (GroupNorm with up to ``norm_groups`` groups) or "none".
        norm_groups: upper bound on the GroupNorm group count.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        n_layers: int = 3,
        norm: str = "group",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        use_bias = norm == "none"  # a norm's own shift makes a conv bias redundant
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = width
        for i in range(1, n_layers + 1):
            out_channels = width * min(2**i, _MAX_WIDTH_MULTIPLIER)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                _normalization(norm, out_channels, norm_groups),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv weights ~ N(0, 0.02) and zero biases; norm scales ~ N(1, 0.02) (the DCGAN / pix2pix init)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, h, w) logits, one per patch."""
        return self.layers(images)
