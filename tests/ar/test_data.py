"""Cached latents as tokens: the loop's batches and the fixed test token sets."""

from __future__ import annotations

import pytest
import torch

from gmpipe.ar.data import make_token_batch_fn, tokenize_split
from gmpipe.ar.tokenizer import LatentTokenizer
from gmpipe.data.latents import LatentSplit, LatentStats

SHAPE = (2, 2, 3)


def _split(n: int = 10) -> LatentSplit:
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(n, *SHAPE, generator=generator) * 2 + 1
    return LatentSplit(mean, torch.full_like(mean, 0.3), torch.arange(n) % 4, torch.zeros(n, dtype=torch.long))


STATS = LatentStats(shift=(1.0, 1.0), scale=(0.5, 0.5))


def test_batches_of_means_are_the_tokens_of_the_normalized_means():
    split, tokenizer = _split(), LatentTokenizer.uniform(8, 3.0, SHAPE)
    index = torch.tensor([3, 0, 7])
    tokens, labels = make_token_batch_fn(split, STATS, tokenizer, "mean")(index, "cpu")
    assert torch.equal(tokens, tokenizer.encode(STATS.normalize(split.mean[index])))
    assert labels.tolist() == [3, 0, 3]


def test_batches_of_posterior_samples_draw_afresh_and_stay_near_the_means():
    split, tokenizer = _split(), LatentTokenizer.uniform(64, 3.0, SHAPE)
    make_batch = make_token_batch_fn(split, STATS, tokenizer, "sample")
    first, _ = make_batch(torch.arange(10), "cpu")
    second, _ = make_batch(torch.arange(10), "cpu")
    assert not torch.equal(first, second)
    means, _ = make_token_batch_fn(split, STATS, tokenizer, "mean")(torch.arange(10), "cpu")
    # normalized posterior std 0.15 is 1.6 bins of width 6 / 64: samples land a few bins from their mean's bin
    assert float((first - means).abs().double().mean()) < 3


def test_test_token_sets_are_reproducible_and_batched_invisibly():
    split, tokenizer = _split(), LatentTokenizer.uniform(16, 3.0, SHAPE)
    tokens, labels = tokenize_split(split, STATS, tokenizer, "sample", seed=5, batch_size=3)
    again, _ = tokenize_split(split, STATS, tokenizer, "sample", seed=5, batch_size=3)
    assert tokens.shape == (10, 12) and torch.equal(tokens, again) and torch.equal(labels, split.labels)
    assert not torch.equal(tokenize_split(split, STATS, tokenizer, "sample", seed=6)[0], tokens)
    means, _ = tokenize_split(split, STATS, tokenizer, "mean", batch_size=4)
    assert torch.equal(means, tokenizer.encode(STATS.normalize(split.mean)))
    with pytest.raises(ValueError, match="posterior"):
        tokenize_split(split, STATS, tokenizer, "mode")
