"""Cached latents as token sequences: training batches for the shared loop and fixed token sets for likelihoods.

``posterior`` chooses which latent of each image is tokenized: ``"sample"`` draws z = mean + std * eps afresh at
every training step (what the diffusion model learns, and what the decoder was trained to read), ``"mean"`` takes
the posterior mean (one fixed token sequence per image, lower entropy). Test token sets use the same choice, with
a seeded draw for ``"sample"`` so the reported likelihood is reproducible.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gmpipe.ar.tokenizer import LatentTokenizer
from gmpipe.data.latents import LatentSplit, LatentStats
from gmpipe.device import transfer

Posterior = Literal["sample", "mean"]


def normalized_latents(split: LatentSplit, stats: LatentStats, index: Tensor, posterior: Posterior,
                       generator: torch.Generator | None = None) -> Tensor:
    """Normalized latents (B, c, h, w) of the items ``index``: posterior samples or means."""
    if posterior == "sample":
        return stats.normalize(split.sample(index, generator))
    if posterior == "mean":
        return stats.normalize(split.mean[index])
    raise ValueError(f"unknown posterior {posterior!r}; choose 'sample' or 'mean'")


def make_token_batch_fn(split: LatentSplit, stats: LatentStats, tokenizer: LatentTokenizer,
                        posterior: Posterior = "sample", null_label: int | None = None):
    """make_batch(index, device) -> (tokens (B, L), labels (B,)) for ``gmpipe.train.loop.train``. With
    ``null_label`` every label is that one (an unconditional model: only the null class is ever trained)."""

    def make_batch(index: Tensor, device):
        tokens = tokenizer.encode(normalized_latents(split, stats, index, posterior))
        labels = split.labels[index] if null_label is None else torch.full((len(index),), null_label)
        return transfer(tokens, device), transfer(labels, device)

    return make_batch


def tokenize_split(split: LatentSplit, stats: LatentStats, tokenizer: LatentTokenizer, posterior: Posterior,
                   seed: int = 0, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Every item of ``split`` as tokens (N, L) with its labels (N,); ``"sample"`` draws from a generator seeded
    with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)))
        chunks.append(tokenizer.encode(normalized_latents(split, stats, index, posterior, generator)))
    tokens = torch.cat(chunks) if chunks else torch.empty(0, tokenizer.sequence_length, dtype=torch.long)
    return tokens, split.labels.clone()
