"""Sampling: inverse-CDF draws, top-k and temperature, guidance against a hand-rolled sampler, per-sample seeds,
the key/value cache, NFE, and decoding to latents."""

from __future__ import annotations

import math

import pytest
import torch

from gmpipe.ar.sampling import (
    filter_top_k,
    per_sample_uniforms,
    sample_from_logits,
    sample_latents,
    sample_tokens,
)
from gmpipe.ar.tokenizer import LatentTokenizer

from .toys import known_distribution_model, random_model

BINS, CLASSES, LENGTH = 6, 3, 12
SEEDS = [11, 12, 13, 14, 15]
LABELS = torch.tensor([0, 1, 2, 3, 1])  # 3 is the null class


def _hand_sampler(model, labels, seeds, guidance, temperature=1.0):
    """Token by token without the cache: each prefix run separately for the class and the null class, the logits
    combined as (1 + w) l_y - w l_null, and x_t the first token whose cumulative probability exceeds u_t."""
    def logits_under(prefix_label, tokens):
        ids = torch.tensor([[prefix_label + model.bins, *tokens]])
        with torch.no_grad():
            embeds = model.input_embeddings(ids, torch.tensor([prefix_label]))  # the class at every position too
            return model.lm(inputs_embeds=embeds).logits[0, -1, : model.bins].double()

    uniforms = per_sample_uniforms(seeds, LENGTH)
    rows = []
    for b, label in enumerate(labels.tolist()):
        tokens = []
        for t in range(LENGTH):
            logits = logits_under(label, tokens)
            if guidance:
                logits = (1 + guidance) * logits - guidance * logits_under(model.null_label, tokens)
            probs = (logits / temperature).softmax(-1).tolist()
            threshold, cumulative, choice = float(uniforms[b, t]) * sum(probs), 0.0, BINS - 1
            for j, p in enumerate(probs):
                cumulative += p
                if cumulative > threshold:
                    choice = j
                    break
            tokens.append(choice)
        rows.append(tokens)
    return torch.tensor(rows)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_sampler_equals_the_hand_rolled_guided_sampler(guidance):
    model = random_model(BINS, CLASSES, LENGTH)
    tokens, nfe = sample_tokens(model, LABELS, SEEDS, guidance=guidance, temperature=0.8)
    assert torch.equal(tokens, _hand_sampler(model, LABELS, SEEDS, guidance, temperature=0.8))
    assert nfe == (2 * LENGTH if guidance else LENGTH)  # as GuidedModelFn.nfe_per_call counts a guided call


def test_zero_guidance_is_conditional_sampling_in_one_pass():
    model = random_model(BINS, CLASSES, LENGTH)
    batch_sizes = []
    record = lambda module, args, kwargs: batch_sizes.append(kwargs["inputs_embeds"].shape[0])  # noqa: E731
    model.lm.transformer.register_forward_pre_hook(record, with_kwargs=True)
    sample_tokens(model, LABELS, SEEDS, guidance=0.0)
    assert batch_sizes == [len(LABELS)] * LENGTH
    batch_sizes.clear()
    sample_tokens(model, LABELS, SEEDS, guidance=2.0)
    assert batch_sizes == [2 * len(LABELS)] * LENGTH  # class and null prefixes in one batch


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_the_cache_gives_the_same_samples_with_one_position_per_step(guidance):
    model = random_model(BINS, CLASSES, LENGTH)
    lengths = []
    record = lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1])  # noqa: E731
    model.lm.transformer.register_forward_pre_hook(record, with_kwargs=True)
    cached, _ = sample_tokens(model, LABELS, SEEDS, guidance=guidance, top_k=4)
    assert lengths == [1] * LENGTH
    uncached, _ = sample_tokens(model, LABELS, SEEDS, guidance=guidance, top_k=4, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_sample_depends_on_its_own_seed_not_on_its_batch():
    model = random_model(BINS, CLASSES, LENGTH)
    settings = dict(guidance=1.0, temperature=1.3, top_k=5)
    together, _ = sample_tokens(model, LABELS, SEEDS, **settings)
    for i in range(len(SEEDS)):
        alone, _ = sample_tokens(model, LABELS[i : i + 1], SEEDS[i : i + 1], **settings)
        assert torch.equal(alone[0], together[i])
    order = [4, 2, 0, 3, 1]
    mixed_labels, mixed_seeds = torch.cat([LABELS[order], torch.tensor([2, 0])]), [SEEDS[i] for i in order] + [99, 7]
    mixed, _ = sample_tokens(model, mixed_labels, mixed_seeds, **settings)
    assert torch.equal(mixed[:5], together[order])
    other_seeds, _ = sample_tokens(model, LABELS, [s + 100 for s in SEEDS], **settings)
    assert not torch.equal(other_seeds, together)


def test_inverse_cdf_draws_follow_the_tempered_distribution():
    # u on the grid (i + 1/2) / n: token j is drawn for the u in [F_{j-1}, F_j), n p_j of them up to one
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    n = 10_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for temperature in (1.0, 0.5, 2.0):
        draws = sample_from_logits(logits.expand(n, -1), uniforms, temperature)
        counts = torch.bincount(draws, minlength=4).double()
        expected = n * (logits[0].double() / temperature).softmax(-1)
        assert float((counts - expected).abs().max()) <= 1


def test_top_k_keeps_the_k_most_likely_tokens_renormalised():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]])
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, False, True, False, False]]
    assert torch.equal(filter_top_k(logits, None), logits) and torch.equal(filter_top_k(logits, 5), logits)
    n = 10_000
    draws = sample_from_logits(logits.expand(n, -1), (torch.arange(n, dtype=torch.float64) + 0.5) / n, top_k=3)
    counts = torch.bincount(draws, minlength=5).double()
    kept = logits[0, [0, 2, 4]].double().softmax(-1) * n
    assert counts[[1, 3]].tolist() == [0, 0] and float((counts[[0, 2, 4]] - kept).abs().max()) <= 1


def test_top_one_is_greedy_whatever_the_seed():
    model = random_model(BINS, CLASSES, LENGTH)
    first, _ = sample_tokens(model, LABELS, SEEDS, top_k=1)
    second, _ = sample_tokens(model, LABELS, [s * 7 + 1 for s in SEEDS], top_k=1)
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(model(first, LABELS).argmax(-1), first)  # each token is the argmax given its prefix


def test_samples_of_a_known_distribution_have_its_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    model = known_distribution_model(probs.log(), num_classes=2, length=8)
    tokens, nfe = sample_tokens(model, torch.zeros(400, dtype=torch.long), list(range(400)))
    frequencies = torch.bincount(tokens.flatten(), minlength=4).double() / tokens.numel()
    # 3200 draws: the standard deviation of a frequency is at most sqrt(0.25 / 3200) = 0.009; tolerance 0.04
    assert float((frequencies - probs.double()).abs().max()) < 0.04 and nfe == 8


def test_sample_latents_decodes_bin_centers_independently_of_the_batch_size():
    tokenizer = LatentTokenizer.uniform(BINS, 2.0, (3, 2, 2))
    model = random_model(BINS, CLASSES, tokenizer.sequence_length)
    latents, nfe = sample_latents(model, tokenizer, LABELS, SEEDS, guidance=0.5, batch_size=2)
    assert latents.shape == (5, 3, 2, 2) and nfe == 2 * tokenizer.sequence_length
    assert bool(torch.isin(latents, tokenizer.centers.float()).all())
    whole, _ = sample_latents(model, tokenizer, LABELS, SEEDS, guidance=0.5, batch_size=64)
    assert torch.equal(latents, whole)
    tokens, _ = sample_tokens(model, LABELS, SEEDS, guidance=0.5)
    assert torch.equal(tokenizer.encode(latents), tokens)


def test_bad_settings_are_refused():
    model = random_model(BINS, CLASSES, LENGTH)
    for settings, message in [(dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"),
                              (dict(top_k=BINS + 1), "top_k"), (dict(guidance=math.nan), "guidance")]:
        with pytest.raises(ValueError, match=message):
            sample_tokens(model, LABELS, SEEDS, **settings)
    with pytest.raises(ValueError, match="class labels"):
        sample_tokens(model, torch.tensor([0, CLASSES + 1]), SEEDS[:2])
    with pytest.raises(ValueError, match="one seed per sample"):
        sample_tokens(model, LABELS, SEEDS[:2])
    with pytest.raises(ValueError, match="does not match"):
        sample_latents(model, LatentTokenizer.uniform(BINS + 1, 2.0, (3, 2, 2)), LABELS, SEEDS)
