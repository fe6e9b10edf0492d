"""Maximum likelihood: the training loss against hand-computed NLL sums, and exact bits per token on known
distributions."""

from __future__ import annotations

import math

import pytest
import torch

from gmpipe.ar.likelihood import (
    LN2,
    ar_loss_step,
    bits_per_dim_piecewise_uniform,
    marginal_bits_per_token,
    sequence_nll,
    token_likelihood,
)
from gmpipe.ar.tokenizer import LatentTokenizer

from .toys import known_distribution_model, random_model

BINS, CLASSES, LENGTH = 6, 3, 12
P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)


def _hand_nll_sums(model, tokens, labels) -> list[float]:
    """sum_t -log p(x_t | x_<t, y) per sequence, from the language model's raw logits, one term at a time."""
    with torch.no_grad():
        ids = torch.cat([labels[:, None] + model.bins, tokens[:, :-1]], dim=1)
        raw = model.lm(inputs_embeds=model.input_embeddings(ids, labels)).logits.double()  # (B, L, vocab)
    sums = []
    for b in range(len(tokens)):
        total = 0.0
        for t in range(tokens.shape[1]):
            values = raw[b, t, : model.bins].tolist()  # p(x_t | .) is a softmax over the value tokens only
            total += math.log(sum(math.exp(v) for v in values)) - values[int(tokens[b, t])]
        sums.append(total)
    return sums


def test_training_loss_is_the_per_token_mean_of_the_summed_nll():
    model = random_model(BINS, CLASSES, LENGTH)
    tokens = torch.randint(0, BINS, (4, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    step = ar_loss_step(model, p_uncond=0.0)
    loss, terms = step.loss((tokens, labels), 0, {}, {"ar": model})
    hand = _hand_nll_sums(model, tokens, labels)
    assert step.name == "ar" and step.module is model and loss.requires_grad
    assert float(loss.detach()) == pytest.approx(sum(hand) / (4 * LENGTH), rel=1e-5)
    assert float(terms["nll_per_sequence"]) == pytest.approx(sum(hand) / 4, rel=1e-5)
    assert float(terms["bits_per_token"]) == pytest.approx(float(loss.detach()) / LN2, rel=1e-6)
    torch.testing.assert_close(sequence_nll(model, tokens, labels).double(), torch.tensor(hand, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_condition_dropout_one_trains_the_null_class_and_zero_the_labels():
    model = random_model(BINS, CLASSES, LENGTH)
    tokens = torch.randint(0, BINS, (3, LENGTH), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2])
    null = torch.full_like(labels, CLASSES)
    dropped, _ = ar_loss_step(model, p_uncond=1.0).loss((tokens, labels), 0, {}, {"ar": model})
    kept, _ = ar_loss_step(model, p_uncond=0.0).loss((tokens, labels), 0, {}, {"ar": model})
    dropped, kept = float(dropped.detach()), float(kept.detach())
    assert dropped == pytest.approx(sum(_hand_nll_sums(model, tokens, null)) / (3 * LENGTH), rel=1e-5)
    assert kept == pytest.approx(sum(_hand_nll_sums(model, tokens, labels)) / (3 * LENGTH), rel=1e-5)
    assert dropped != pytest.approx(kept, rel=1e-3)
    with pytest.raises(ValueError, match="p_uncond"):
        ar_loss_step(model, p_uncond=1.5)


def test_bits_per_token_are_exact_under_a_known_distribution():
    model = known_distribution_model(P.float().log(), num_classes=2, length=LENGTH)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.multinomial(P, 600 * LENGTH, replacement=True, generator=generator).view(600, LENGTH)
    labels = torch.randint(0, 3, (600,), generator=generator)  # the null class included
    exact = float(-P.log2()[tokens].mean())
    result = token_likelihood(model, tokens, labels, batch_size=64)
    assert result.n_tokens == 600 * LENGTH and result.n_sequences == 600
    # The model's probabilities are P rounded to float32 and renormalised by a float32 softmax: relative error ~1e-7.
    assert result.bits_per_token == pytest.approx(exact, rel=1e-6)
    assert result.bits_per_sequence == pytest.approx(exact * LENGTH, rel=1e-6)
    # And on data drawn from P the mean is the entropy H(P) up to sampling noise: std(-log2 P(x)) / sqrt(n) = 0.011
    # bits at n = 7200; the tolerance is 5 standard deviations.
    entropy = float(-(P * P.log2()).sum())
    spread = float(((P * P.log2().square()).sum() - entropy**2).sqrt())
    assert result.bits_per_token == pytest.approx(entropy, abs=5 * spread / math.sqrt(result.n_tokens))


def test_likelihood_does_not_depend_on_the_batch_size_and_labels_none_is_the_null_class():
    model = random_model(BINS, CLASSES, LENGTH)
    tokens = torch.randint(0, BINS, (37, LENGTH), generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, CLASSES, (37,), generator=torch.Generator().manual_seed(5))
    totals = [token_likelihood(model, tokens, labels, batch_size=size).nats_total for size in (1, 8, 37, 100)]
    assert max(totals) - min(totals) <= 1e-9 * abs(totals[0])
    assert totals[0] == pytest.approx(sum(_hand_nll_sums(model, tokens, labels)), rel=1e-5)
    unconditional = token_likelihood(model, tokens, None).nats_total
    assert unconditional == pytest.approx(sum(_hand_nll_sums(model, tokens, torch.full((37,), CLASSES))), rel=1e-5)


def test_likelihood_runs_without_dropout_and_restores_the_training_mode():
    model = random_model(BINS, CLASSES, LENGTH)
    tokens = torch.randint(0, BINS, (5, LENGTH), generator=torch.Generator().manual_seed(6))
    evaluated = token_likelihood(model, tokens, None).nats_total
    model.train()
    assert token_likelihood(model, tokens, None).nats_total == pytest.approx(evaluated, rel=1e-12)
    assert model.training


def test_uniform_model_on_uniform_bins_has_the_density_of_a_uniform_latent():
    # p uniform over the bins: log2(bins) bits per token; each bin has width 2 clip / bins, so the piecewise-uniform
    # density is 1 / (2 clip) and the bits per value are log2(2 clip), whatever the bin count.
    bins, clip = 16, 3.0
    tokenizer = LatentTokenizer.uniform(bins, clip, (2, 2, 2))
    model = known_distribution_model(torch.zeros(bins), num_classes=2, length=tokenizer.sequence_length)
    tokens = torch.randint(0, bins, (20, tokenizer.sequence_length), generator=torch.Generator().manual_seed(7))
    result = token_likelihood(model, tokens)
    assert result.bits_per_token == pytest.approx(math.log2(bins), rel=1e-6)
    assert bits_per_dim_piecewise_uniform(result, tokenizer, tokens) == pytest.approx(math.log2(2 * clip), rel=1e-6)


def test_marginal_reference_is_the_per_position_add_one_frequency():
    train = torch.tensor([[0, 1], [0, 0]])
    test = torch.tensor([[0, 1]])
    # position 0: counts (1 + 2, 1 + 0) -> p(0) = 3/4; position 1: (1 + 1, 1 + 1) -> p(1) = 1/2
    expected = -(math.log2(3 / 4) + math.log2(1 / 2)) / 2
    assert marginal_bits_per_token(train, test, bins=2) == pytest.approx(expected)
