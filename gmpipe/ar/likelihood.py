"""Maximum likelihood for the autoregressive prior: the training loss and the exact test likelihood.

The chain rule gives the exact log-likelihood of a token sequence x = (x_0, ..., x_{L-1}) given a class y:

    -log p(x | y) = sum_t -log p(x_t | x_<t, y),   p(x_t | x_<t, y) = softmax(value logits at t)[x_t]

Training minimises its per-token mean (nats) under condition dropout (y replaced by the null class with
probability p_uncond, for classifier-free guidance). Test likelihood is reported in bits per token,
the mean over all test tokens of -log2 p(x_t | x_<t, y), accumulated in float64 so it is exact, not an estimate.

Bits per token measure the tokens, not the continuous latents. Reading each bin as a uniform density over its width
turns them into a density of the clipped latents: -log2 p(x) = -log2 P(token) + log2 width(bin), averaged per value
(``bits_per_dim_piecewise_uniform``); values beyond the clip range have no density under that reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gmpipe.ar.model import LatentAR
from gmpipe.ar.tokenizer import LatentTokenizer
from gmpipe.diffusion.guidance import drop_conditions
from gmpipe.train.step import LossStep

LN2 = math.log(2.0)


def token_nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """-log p(x_t | x_<t, y) in nats, (B, L), for value logits (B, L, bins) and tokens (B, L)."""
    log_probs = logits.float().log_softmax(dim=-1)  # float32 even under autocast: a softmax over bins in bf16 is coarse
    return -log_probs.gather(-1, tokens[..., None]).squeeze(-1)


def sequence_nll(model: LatentAR, tokens: Tensor, labels: Tensor) -> Tensor:
    """-log p(x | y) = sum_t -log p(x_t | x_<t, y) in nats, (B,), for tokens (B, L) and labels (B,)."""
    return token_nll(model(tokens, labels), tokens).sum(dim=1)


def ar_loss_step(model: LatentAR, p_uncond: float, name: str = "ar") -> LossStep:
    """The training step for the shared loop: batch = (tokens (B, L), labels (B,)).

    loss = mean over the batch and the L positions of -log p(x_t | x_<t, y'), nats per token, with y' = y or the
    null class with probability p_uncond. Logged terms: ``loss`` (that mean), ``bits_per_token`` (loss / ln 2) and
    ``nll_per_sequence`` (the exact per-sequence sum -log p(x | y') in nats, averaged over the batch).
    """
    if not 0 <= p_uncond <= 1:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")

    def loss(batch, step, context, modules):
        tokens, labels = batch
        labels = drop_conditions(labels, p_uncond, model.null_label)
        per_token = token_nll(modules[name](tokens, labels), tokens)  # (B, L)
        value = per_token.mean()
        nll = per_token.detach().sum(dim=1).mean()
        return value, {"loss": value.detach(), "bits_per_token": value.detach() / LN2, "nll_per_sequence": nll}

    return LossStep(name, model, loss)


@dataclass(frozen=True)
class TokenLikelihood:
    """An exact likelihood over a token set: nats_total = sum over sequences and positions of -ln p(x_t | x_<t, y)."""

    nats_total: float
    n_tokens: int
    n_sequences: int

    @property
    def bits_per_token(self) -> float:
        return self.nats_total / self.n_tokens / LN2

    @property
    def bits_per_sequence(self) -> float:
        return self.nats_total / self.n_sequences / LN2

    def to_dict(self) -> dict[str, float]:
        return {"bits_per_token": self.bits_per_token, "bits_per_sequence": self.bits_per_sequence,
                "n_tokens": self.n_tokens, "n_sequences": self.n_sequences}


@torch.no_grad()
def token_likelihood(model: LatentAR, tokens: Tensor, labels: Tensor | None = None,
                     batch_size: int = 32) -> TokenLikelihood:
    """The exact likelihood of ``tokens`` (N, L) given ``labels`` (N,), in batches; labels None means the null
    class (the unconditional model). The model is put in eval mode (no dropout) and restored afterwards.

    Small batches are the fast ones on a CPU: the demo's prior (width 128, 257 positions) scored 512 sequences in
    3.0-4.4 s at 8-48 per batch and in 6.3-7.6 s at 64-256, whose activations (e.g. 256 x 257 x 512 floats per MLP
    layer) no longer fit the caches."""
    if labels is None:
        labels = torch.full((len(tokens),), model.null_label, dtype=torch.long)
    if len(tokens) == 0 or len(labels) != len(tokens):
        raise ValueError(f"need N >= 1 token sequences with one label each, got {len(tokens)} and {len(labels)}")
    model.check_labels(labels)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start:start + batch_size].to(device)
            nll = token_nll(model(chunk, labels[start:start + batch_size].to(device)), chunk)
            total += nll.double().sum().cpu()
    finally:
        model.train(was_training)
    return TokenLikelihood(float(total), tokens.numel(), len(tokens))


def bits_per_dim_piecewise_uniform(likelihood: TokenLikelihood, tokenizer: LatentTokenizer, tokens: Tensor) -> float:
    """Bits per value of the clipped normalized latents, reading each bin as a uniform density over its width:
    bits_per_token + mean over the same tokens (N, L) of log2 width(bin). See the module docstring for the caveat."""
    if tokens.numel() != likelihood.n_tokens:
        raise ValueError(f"the likelihood covers {likelihood.n_tokens} tokens, got {tokens.numel()}")
    return likelihood.bits_per_token + float(tokenizer.log2_bin_widths(tokens).mean())


def marginal_bits_per_token(train_tokens: Tensor, test_tokens: Tensor, bins: int) -> float:
    """The context-free reference: bits per test token under each position's token frequencies in the training
    tokens (add-one smoothed). A model that ignores x_<t and y can do no better on average; the gap to the
    model's bits per token is what context buys."""
    counts = torch.ones(train_tokens.shape[1], bins, dtype=torch.float64)  # (L, bins), add-one
    counts.scatter_add_(1, train_tokens.T.contiguous(), torch.ones(train_tokens.T.shape, dtype=torch.float64))
    log2_probs = (counts / counts.sum(dim=1, keepdim=True)).log2()
    positions = torch.arange(test_tokens.shape[1])[None, :].expand_as(test_tokens)
    return float(-log2_probs[positions, test_tokens].mean())
