"""Perceptual distance between images, LPIPS-style (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", eq. 1):

    d(x, y) = 1/L sum_l 1/(H_l W_l) sum_{h,w} || w_l * (f^l_hw(x) / ||f^l_hw(x)|| - f^l_hw(y) / ||f^l_hw(y)||) ||^2

f^l are the feature maps of a frozen network, normalised to unit length along channels at every position; w_l are
per-channel linear weights (all ones when none are given). Two departures from LPIPS, written down here: layers
are averaged (LPIPS sums them) so the distance does not grow with the number of layers, and the default network
is EfficientNet-Lite0 (``gmpipe.nn.features.EffNetLite0Features``), because no installable package ships the
VGG/AlexNet weights LPIPS was calibrated on.

Learned LPIPS heads. ``load_lpips_layer_weights(path)`` reads a local LPIPS weights file (the official
``vgg.pth``/``alex.pth`` layout, keys ``lin{l}.model.1.weight`` of shape (1, C_l, 1, 1), or ``lin{l}.weight``),
as safetensors or with ``torch.load(weights_only=True)``. The heads were fitted on one backbone's channels, so
pass them only together with an extractor for that backbone (e.g. your own VGG-16 with the LPIPS layers); the
channel counts are checked at the first call.

The ``lpips`` package (``pip install lpips``) ships those heads, ``lpips/weights/v0.1/{vgg,alex,squeeze}.pth``;
``packaged_lpips_weights`` finds them without importing the package (which imports torchvision), so an installed
``lpips`` supplies the heads when no file is named. Only the VGG trunk has to come from a local file.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

_LPIPS_KEY = re.compile(r"^lin(\d+)\.(?:model\.\d+\.)?weight$")


class FeatureMapExtractor(Protocol):
    """Anything with ``feature_maps(images (B, C, H, W) in [-1, 1]) -> list of (B, C_l, H_l, W_l)``,
    differentiable with respect to the images. The extractor does its own resizing and normalisation."""

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]: ...


def load_lpips_layer_weights(path: str | Path) -> list[torch.Tensor]:
    """Per-layer channel weights w_l, (C_l,) each in layer order, from a local LPIPS weights file.

    Reads ``.safetensors`` or a torch file with ``weights_only=True``; keys ``lin{l}.model.1.weight`` (official
    LPIPS) or ``lin{l}.weight``, shapes (1, C_l, 1, 1) or (C_l,). Other keys are ignored; a file without any
    such key is an error naming the file.
    """
    from gmpipe.nn.features import load_weights_file  # lazy: keeps this module light to import

    state = load_weights_file(path)
    by_layer = {}
    for key, tensor in state.items():
        match = _LPIPS_KEY.match(key)
        if match:
            by_layer[int(match.group(1))] = tensor.detach().float().flatten()
    if not by_layer:
        raise ValueError(f"{path}: no LPIPS linear-layer weights (keys like 'lin0.model.1.weight') found")
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ValueError(f"{path}: LPIPS layers {sorted(by_layer)} are not numbered 0..{len(by_layer) - 1}")
    return [by_layer[index] for index in range(len(by_layer))]


LPIPS_PACKAGE = "lpips"
LPIPS_VERSION = "v0.1"  # the heads LPIPS recommends (fitted on top of the trunk's ImageNet features)


def packaged_lpips_weights(net: str = "vgg") -> Path | None:
    """The LPIPS heads file the installed ``lpips`` package ships for ``net`` ("vgg", "alex" or "squeeze"), or None
    when the package (or that file) is not there. The package is located, never imported."""
    try:
        spec = importlib.util.find_spec(LPIPS_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "weights" / LPIPS_VERSION / f"{net}.pth"
        if path.is_file():
            return path
    return None


def normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """f / ||f|| along channels at every position: (B, C, H, W) -> (B, C, H, W). ``eps`` inside the square
    root keeps the gradient finite where a feature vector is zero."""
    return features * torch.rsqrt(features.square().sum(dim=1, keepdim=True) + eps)


class PerceptualLoss(nn.Module):
    """Frozen LPIPS-style distance (see the module docstring), differentiable with respect to the images.

    Args:
        extractor: a ``FeatureMapExtractor``; default ``EffNetLite0Features(image_size=64)`` (imported lazily).
            If it is an ``nn.Module`` it becomes a submodule (moves with ``.to()``), is put in eval mode and its
            parameters stop requiring gradients. ``parameters()`` therefore lists frozen weights: optimise
            only the ones with ``requires_grad``. Any other extractor must be frozen and in eval mode already
            (x and y go through it as one batch).
        layer_weights: optional learned heads w_l, one non-negative (C_l,) tensor per feature map (see
            ``load_lpips_layer_weights``); None weighs every channel 1.
    """

    def __init__(
        self,
        extractor: FeatureMapExtractor | None = None,
        layer_weights: Sequence[torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if extractor is None:
            from gmpipe.nn.features import EffNetLite0Features

            extractor = EffNetLite0Features(image_size=64)
        if isinstance(extractor, nn.Module):
            extractor.eval()
            extractor.requires_grad_(False)
        self.extractor = extractor
        self.n_weighted_layers = 0
        for index, weight in enumerate(layer_weights or ()):
            weight = torch.as_tensor(weight, dtype=torch.float32).flatten()
            if (weight < 0).any():
                raise ValueError(f"LPIPS layer weights must be non-negative (layer {index})")
            self.register_buffer(f"layer_weight_{index}", weight)
            self.n_weighted_layers += 1

    @classmethod
    def from_lpips_weights(cls, path: str | Path, extractor: FeatureMapExtractor | None = None) -> PerceptualLoss:
        """A perceptual loss with the learned heads of a local LPIPS weights file (see the module docstring)."""
        return cls(extractor, load_lpips_layer_weights(path))

    def train(self, mode: bool = True) -> PerceptualLoss:
        # The extractor stays in eval mode (frozen batch-norm statistics) inside a module put in training mode.
        super().train(mode)
        if isinstance(self.extractor, nn.Module):
            self.extractor.eval()
        return self

    def _layer_weights(self, n_layers: int) -> list[torch.Tensor | None]:
        if self.n_weighted_layers == 0:
            return [None] * n_layers
        if self.n_weighted_layers != n_layers:
            raise ValueError(
                f"{self.n_weighted_layers} LPIPS layer weights given but the extractor returns {n_layers} maps"
            )
        return [getattr(self, f"layer_weight_{index}") for index in range(n_layers)]

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance d(x, y): images (B, C, H, W) each, in [-1, 1] -> (B,).

        d >= 0, and d = 0 where the normalised feature maps agree (e.g. x = y)."""
        if x.shape != y.shape:
            raise ValueError(f"perceptual loss needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if torch.is_grad_enabled() and x.requires_grad != y.requires_grad:
            # Training compares an image that needs a gradient with a constant one (a real image, a teacher's
            # image): only the former's half needs the backward through the extractor, so the constant goes
            # through it without a graph (one backward of B images instead of 2 B).
            with torch.no_grad():
                constant_maps = self.extractor.feature_maps(y if x.requires_grad else x)
            graph_maps = self.extractor.feature_maps(x if x.requires_grad else y)
            x_maps, y_maps = (graph_maps, constant_maps) if x.requires_grad else (constant_maps, graph_maps)
        else:
            # One pass over both batches; the frozen extractor is in eval mode, so samples do not interact.
            maps = self.extractor.feature_maps(torch.cat([x, y]))
            x_maps, y_maps = [m[: x.shape[0]] for m in maps], [m[x.shape[0]:] for m in maps]
        per_layer = []
        for x_features, y_features, weight in zip(x_maps, y_maps, self._layer_weights(len(x_maps)), strict=True):
            difference = (normalize_channels(x_features) - normalize_channels(y_features)).square()
            if weight is not None:
                if weight.numel() != difference.shape[1]:
                    raise ValueError(
                        f"LPIPS layer weight has {weight.numel()} channels, feature map has {difference.shape[1]}"
                    )
                difference = difference * weight.view(1, -1, 1, 1)
            per_layer.append(difference.sum(dim=1).mean(dim=(1, 2)))
        return torch.stack(per_layer).mean(dim=0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch mean of ``distance(x, y)``: scalar."""
        return self.distance(x, y).mean()
