"""Sampling the autoregressive prior: ancestral sampling token by token, with classifier-free guidance on logits,
temperature and top-k, on the model's key/value cache.

At position t the value logits l_y (under the class prefix) and l_null (under the null prefix) are combined as

    l = (1 + w) l_y - w l_null        (gmpipe.diffusion.guidance.guided_prediction; w = 0 is the plain model)

then divided by the temperature, cut to the top k, and x_t is drawn from softmax(l) by inverse CDF with one
uniform number. Both prefixes run in one batch of 2B rows (B rows when w = 0).

Cost: with the cache, step t feeds only the token drawn at t - 1 (one position per row), so a sample costs L forwards
of one position; the cache is allocated once for the L positions (``gmpipe.ar.kv_cache``: a cache that grew by
concatenation spent most of the sampling time copying itself). NFE per sample is counted as the project counts
guided calls (``GuidedModelFn.nfe_per_call``): L network evaluations, times 2 when w != 0.

Reproducibility: sample i draws its L uniforms from its own ``torch.Generator`` seeded with seeds[i], so it depends
on its seed, label and the sampling settings only, not on the batch size or on which other samples share its batch
(up to floating-point rounding of batched matrix products, which would have to move a logit across a CDF boundary
to change a token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gmpipe.ar.model import LatentAR
from gmpipe.ar.tokenizer import LatentTokenizer
from gmpipe.diffusion.guidance import guided_prediction


def filter_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    """logits (B, V) with all but the k largest of each row set to -inf (ties at the k-th value are kept)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def sample_from_logits(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """Tokens (B,) drawn from softmax(filter_top_k(logits / temperature)) by inverse CDF: the first token whose
    cumulative probability exceeds u, for logits (B, V) and uniforms (B,) in [0, 1). Tokens of zero probability
    are never drawn."""
    probs = filter_top_k(logits.double() / temperature, top_k).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    threshold = uniforms.double()[:, None] * cdf[:, -1:]  # scaled by the total so rounding cannot overshoot it
    return torch.searchsorted(cdf, threshold, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def per_sample_uniforms(seeds: Sequence[int], length: int) -> Tensor:
    """(B, length) float64 uniforms, row i drawn from a CPU generator seeded with seeds[i] alone."""
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
            for seed in seeds]
    return torch.stack(rows) if rows else torch.empty(0, length, dtype=torch.float64)


def check_sampling_settings(guidance: float, temperature: float, top_k: int | None, bins: int) -> None:
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if top_k is not None and not 1 <= top_k <= bins:
        raise ValueError(f"top_k must be in [1, {bins}] or None, got {top_k}")


@torch.no_grad()
def sample_tokens(model: LatentAR, labels: Tensor, seeds: Sequence[int], guidance: float = 0.0,
                  temperature: float = 1.0, top_k: int | None = None, use_cache: bool = True) -> tuple[Tensor, int]:
    """Tokens (B, L) for class labels (B,) (the null label samples the unconditional model) and one seed per
    sample, and the NFE per sample (L, or 2 L when guidance != 0). ``use_cache=False`` reruns the whole prefix at
    every step (same tokens, quadratic cost; kept to check the cache)."""
    check_sampling_settings(guidance, temperature, top_k, model.bins)
    if len(seeds) != len(labels):
        raise ValueError(f"need one seed per sample: {len(labels)} labels but {len(seeds)} seeds")
    model.check_labels(labels)
    device = next(model.parameters()).device
    length, batch = model.sequence_length, len(labels)
    guided = guidance != 0
    nfe_per_position = 2 if guided else 1
    uniforms = per_sample_uniforms(seeds, length).to(device)  # (B, L)
    rows = labels.to(device)  # (B,): the class of each row
    if guided:
        rows = torch.cat([rows, torch.full_like(rows, model.null_label)])  # (2B,): conditional rows first
    prefixes = model.prefix_tokens(rows)  # (B or 2B, 1)
    was_training = model.training
    model.eval()
    try:
        tokens = torch.empty(batch, length, dtype=torch.long, device=device)
        inputs, cache = prefixes, model.sampling_cache() if use_cache else None
        for t in range(length):
            if use_cache:
                logits, cache = model.next_logits(inputs, rows, cache)  # inputs: the newest position only
            else:
                logits, _ = model.next_logits(torch.cat([prefixes, _repeat(tokens[:, :t], nfe_per_position)], 1),
                                              rows)
            if guided:
                logits = guided_prediction(*logits.float().chunk(2), guidance)
            tokens[:, t] = sample_from_logits(logits, uniforms[:, t], temperature, top_k)
            inputs = _repeat(tokens[:, t:t + 1], nfe_per_position)
    finally:
        model.train(was_training)
    return tokens, length * nfe_per_position


@torch.no_grad()
def sample_latents(model: LatentAR, tokenizer: LatentTokenizer, labels: Tensor, seeds: Sequence[int],
                   guidance: float = 0.0, temperature: float = 1.0, top_k: int | None = None,
                   batch_size: int = 256) -> tuple[Tensor, int]:
    """Normalized latents (B, c, h, w) (the tokenizer's bin centers) for labels (B,) and per-sample seeds, drawn in
    batches of ``batch_size`` (the result does not depend on it), and the NFE per sample."""
    if tokenizer.bins != model.bins or tokenizer.sequence_length != model.sequence_length:
        raise ValueError(f"the tokenizer ({tokenizer.bins} bins, L = {tokenizer.sequence_length}) does not match "
                         f"the model ({model.bins} bins, L = {model.sequence_length})")
    if len(seeds) != len(labels):
        raise ValueError(f"need one seed per sample: {len(labels)} labels but {len(seeds)} seeds")
    chunks, nfe = [], model.sequence_length * (2 if guidance != 0 else 1)
    for start in range(0, len(labels), batch_size):
        tokens, nfe = sample_tokens(model, labels[start:start + batch_size], seeds[start:start + batch_size],
                                    guidance, temperature, top_k)
        chunks.append(tokenizer.decode(tokens.cpu()))
    shape = (0, *tokenizer.latent_shape)
    return (torch.cat(chunks) if chunks else torch.empty(shape)), nfe


def _repeat(tokens: Tensor, times: int) -> Tensor:
    """The same tokens for the conditional and the null rows: (B, n) -> (times * B, n)."""
    return tokens.repeat(times, 1) if times > 1 else tokens
