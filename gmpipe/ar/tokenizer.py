"""Scalar quantization of normalized latents into tokens, and back.

Each value of a normalized latent (B, c, h, w) (``LatentStats.normalize``: roughly N(0, 1) per channel) is clipped
to [lo_k, hi_k] and replaced by the index of its bin among ``bins`` bins of its channel k. Bin j of channel k is
[edges[k, j], edges[k, j + 1]); the last bin also holds hi_k. Decoding replaces each token by its bin's center,
``centers[k, j]``. Bins are per channel, so a token index means "bin j of the channel at this position".

Edges: ``uniform`` (equal widths over [-clip, clip]) or ``quantile`` (equal counts of the fitting data, outer edges
at +-clip, so a model sees every bin equally often). Centers: the mean of the fitting data in each bin, which is
the reconstruction with the least squared error for those edges (the midpoint for an empty bin).

Token order ("hwc"): raster over (h, w), the c channels of one position next to each other,
t = (i * w + j) * c + k. The channels of one position describe the same image patch and are strongly dependent;
interleaving them lets the model predict each one from the others at that position (and from every earlier
position), instead of generating a whole channel before it sees the next one (channel-major would put the
dependent values h * w tokens apart). This is the order of a PixelCNN's colour channels within a pixel.

``tokenizer.json`` (next to the model) stores bins, clip, spacing, latent shape, order, edges and centers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from gmpipe.artifacts import read_json, write_json

TOKENIZER_FILE = "tokenizer.json"
ORDER = "hwc"
SPACINGS = ("uniform", "quantile")

Finite = Annotated[float, Field(allow_inf_nan=False)]


class TokenizerFile(BaseModel):
    """``tokenizer.json``: per channel, bins + 1 non-decreasing edges and bins centers inside their bins."""

    model_config = ConfigDict(extra="forbid", strict=True)
    bins: Annotated[int, Field(ge=2)]
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    spacing: Literal["uniform", "quantile"]
    order: Literal["hwc"]
    latent_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    edges: list[list[Finite]]
    centers: list[list[Finite]]

    @model_validator(mode="after")
    def _consistent(self) -> TokenizerFile:
        channels = self.latent_shape[0]
        if len(self.edges) != channels or len(self.centers) != channels:
            raise ValueError(f"{channels} channels but {len(self.edges)} edge rows and {len(self.centers)} center rows")
        for k, (edges, centers) in enumerate(zip(self.edges, self.centers, strict=True)):
            if len(edges) != self.bins + 1 or len(centers) != self.bins:
                raise ValueError(f"channel {k}: {len(edges)} edges and {len(centers)} centers for {self.bins} bins")
            if any(b < a for a, b in zip(edges, edges[1:], strict=False)) or not edges[0] < edges[-1]:
                raise ValueError(f"channel {k}: edges are not increasing")
            if any(not edges[j] <= c <= edges[j + 1] for j, c in enumerate(centers)):
                raise ValueError(f"channel {k}: a center lies outside its bin")
        return self


@dataclass(frozen=True, eq=False)
class QuantizationFloor:
    """How much the tokenizer alone loses on some latents: the best any model of its tokens can reconstruct.

    mse: mean of (decode(encode(x)) - x)^2 over all values; psnr_db: 10 log10(range^2 / mse) with range the
    mean clip range hi - lo (the latent analogue of 255 for images); snr_db: 10 log10(mean x^2 / mse);
    clipped_fraction: share of values outside [lo, hi]; n_values: how many values were measured.
    """

    mse: float
    psnr_db: float
    snr_db: float
    clipped_fraction: float
    n_values: int

    def to_dict(self) -> dict[str, float]:
        return {"mse": self.mse, "psnr_db": self.psnr_db, "snr_db": self.snr_db,
                "clipped_fraction": self.clipped_fraction, "n_values": self.n_values}


class LatentTokenizer:
    """encode: normalized latents (B, c, h, w) -> tokens (B, L) int64 in [0, bins), L = c * h * w ("hwc" order);
    decode: tokens (B, L) -> latents (B, c, h, w) of bin centers. See the module docstring."""

    def __init__(self, edges: Tensor, centers: Tensor, latent_shape: tuple[int, int, int], clip: float,
                 spacing: str) -> None:
        channels = latent_shape[0]
        if edges.ndim != 2 or edges.shape[0] != channels or centers.shape != (channels, edges.shape[1] - 1):
            raise ValueError(f"edges {tuple(edges.shape)} and centers {tuple(centers.shape)} do not fit "
                             f"{channels} channels")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
        self.edges = edges.double()  # (c, bins + 1)
        self.centers = centers.double()  # (c, bins)
        self.latent_shape = tuple(int(n) for n in latent_shape)
        self.clip = float(clip)
        self.spacing = spacing

    @property
    def bins(self) -> int:
        return self.centers.shape[1]

    @property
    def sequence_length(self) -> int:
        """L = c * h * w tokens per latent."""
        return math.prod(self.latent_shape)

    # Construction.

    @classmethod
    def uniform(cls, bins: int, clip: float, latent_shape: tuple[int, int, int]) -> LatentTokenizer:
        """Equal-width bins over [-clip, clip] in every channel, centered at their midpoints (no data needed)."""
        _check_bins(bins, clip)
        edges = torch.linspace(-clip, clip, bins + 1, dtype=torch.float64).expand(latent_shape[0], -1).clone()
        return cls(edges, (edges[:, 1:] + edges[:, :-1]) / 2, latent_shape, clip, "uniform")

    @classmethod
    def fit(cls, latents: Tensor, bins: int, clip: float, spacing: str = "uniform") -> LatentTokenizer:
        """Edges (``uniform`` or ``quantile``) and per-bin mean centers fitted on normalized latents (N, c, h, w)."""
        _check_bins(bins, clip)
        if latents.ndim != 4 or latents.shape[0] == 0:
            raise ValueError(f"expected latents (N, c, h, w) with N >= 1, got {tuple(latents.shape)}")
        _check_finite(latents)
        channels = latents.shape[1]
        values = latents.double().transpose(0, 1).reshape(channels, -1).clamp(-clip, clip)  # (c, N h w)
        if spacing == "uniform":
            edges = torch.linspace(-clip, clip, bins + 1, dtype=torch.float64).expand(channels, -1).clone()
        elif spacing == "quantile":
            edges = torch.stack([_quantile_edges(row, bins, clip) for row in values])
        else:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
        index = _bin_index(values, edges)
        counts = torch.zeros(channels, bins, dtype=torch.float64).scatter_add_(1, index, torch.ones_like(values))
        sums = torch.zeros(channels, bins, dtype=torch.float64).scatter_add_(1, index, values)
        midpoints = (edges[:, 1:] + edges[:, :-1]) / 2
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), midpoints)
        # a mean of values in [edges[j], edges[j+1]] can leave the bin only by rounding
        centers = torch.minimum(torch.maximum(centers, edges[:, :-1]), edges[:, 1:])
        return cls(edges, centers, tuple(latents.shape[1:]), clip, spacing)

    # The two maps.

    def encode(self, latents: Tensor) -> Tensor:
        """Normalized latents (B, c, h, w) -> tokens (B, L) int64, t = (i * w + j) * c + k."""
        self._check_shape(latents.shape[1:], "latents")
        _check_finite(latents)
        batch, channels = latents.shape[0], self.latent_shape[0]
        values = latents.double().permute(1, 0, 2, 3).reshape(channels, -1)  # (c, B h w)
        index = _bin_index(values, self.edges.to(latents.device))
        index = index.reshape(channels, batch, *self.latent_shape[1:]).permute(1, 2, 3, 0)  # (B, h, w, c)
        return index.reshape(batch, -1)

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, L) -> latents (B, c, h, w) float32: each token replaced by its bin's center."""
        if tokens.ndim != 2 or tokens.shape[1] != self.sequence_length:
            raise ValueError(f"expected tokens (B, {self.sequence_length}), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.bins):
            raise ValueError(f"tokens must lie in [0, {self.bins})")
        channels, height, width = self.latent_shape
        per_channel = tokens.reshape(-1, height, width, channels).permute(3, 0, 1, 2).reshape(channels, -1)
        values = torch.gather(self.centers.to(tokens.device), 1, per_channel)  # (c, B h w)
        return values.reshape(channels, -1, height, width).transpose(0, 1).float()

    def log2_bin_widths(self, tokens: Tensor) -> Tensor:
        """log2 of the width of each token's bin, (B, L) float64: turns token probabilities into densities."""
        channels = self.latent_shape[0]
        widths = (self.edges[:, 1:] - self.edges[:, :-1]).to(tokens.device)  # (c, bins)
        channel_of_position = torch.arange(tokens.shape[1], device=tokens.device) % channels  # "hwc" order
        return widths[channel_of_position[None, :], tokens].log2()

    # Persistence.

    def to_config(self) -> dict:
        return {"bins": self.bins, "clip": self.clip, "spacing": self.spacing, "order": ORDER,
                "latent_shape": list(self.latent_shape), "edges": self.edges.tolist(), "centers": self.centers.tolist()}

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` atomically; return its path."""
        path = Path(directory) / TOKENIZER_FILE
        write_json(path, self.to_config())
        return path

    @classmethod
    def load(cls, directory: str | Path, stage: str = "train_ar") -> LatentTokenizer:
        """Read and check ``directory/tokenizer.json``; a damaged file is one ArtifactError naming it and ``stage``."""
        raw = read_json(Path(directory) / TOKENIZER_FILE, stage, TokenizerFile.model_validate)
        return cls(torch.tensor(raw.edges, dtype=torch.float64), torch.tensor(raw.centers, dtype=torch.float64),
                   tuple(raw.latent_shape), raw.clip, raw.spacing)

    def _check_shape(self, shape, what: str) -> None:
        if tuple(shape) != self.latent_shape:
            raise ValueError(f"{what} have shape {tuple(shape)} per item; this tokenizer expects {self.latent_shape}")


def reconstruction_floor(tokenizer: LatentTokenizer, latents: Tensor, batch_size: int = 4096) -> QuantizationFloor:
    """The tokenizer's own error on normalized latents (N, c, h, w): decode(encode(x)) vs x (see QuantizationFloor)."""
    if len(latents) == 0:
        raise ValueError("no latents to measure the reconstruction floor on")
    squared_error = signal = clipped = 0.0
    lo, hi = tokenizer.edges[:, 0].view(1, -1, 1, 1), tokenizer.edges[:, -1].view(1, -1, 1, 1)
    for start in range(0, len(latents), batch_size):
        x = latents[start:start + batch_size].double()
        x_hat = tokenizer.decode(tokenizer.encode(x)).double()
        squared_error += float((x_hat - x).square().sum())
        signal += float(x.square().sum())
        clipped += float(((x < lo) | (x > hi)).sum())
    n_values = latents.numel()
    mse = squared_error / n_values
    value_range = float((tokenizer.edges[:, -1] - tokenizer.edges[:, 0]).mean())
    return QuantizationFloor(
        mse=mse,
        psnr_db=10 * math.log10(value_range**2 / mse) if mse > 0 else math.inf,
        snr_db=10 * math.log10(signal / n_values / mse) if mse > 0 else math.inf,
        clipped_fraction=clipped / n_values,
        n_values=n_values,
    )


def _bin_index(values: Tensor, edges: Tensor) -> Tensor:
    """Bin of each value, (c, n) int64 for values (c, n) and edges (c, bins + 1); values beyond the outer edges
    go to the first or last bin (clipping). A value equal to an inner edge belongs to the bin it opens."""
    inner = edges[:, 1:-1].contiguous()
    return torch.searchsorted(inner, values.contiguous(), right=True)


def _quantile_edges(values: Tensor, bins: int, clip: float) -> Tensor:
    """bins + 1 edges of one channel: -clip, the j / bins quantiles of the clipped values (j = 1..bins-1), clip."""
    ordered = values.sort().values
    position = torch.arange(1, bins, dtype=torch.float64) / bins * (len(ordered) - 1)
    below, frac = position.floor().long(), position - position.floor()
    inner = ordered[below] + frac * (ordered[(below + 1).clamp_max(len(ordered) - 1)] - ordered[below])
    return torch.cat([torch.tensor([-clip], dtype=torch.float64), inner, torch.tensor([clip], dtype=torch.float64)])


def _check_bins(bins: int, clip: float) -> None:
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a positive finite number, got {clip}")


def _check_finite(latents: Tensor) -> None:
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents hold NaN or Inf values")
