"""Autoregressive models whose distribution is known, and token sources of known entropy.

``known_distribution_model``: GPT-2's final layer norm with weight 0 outputs its bias for every position, whatever
the input; with that bias the unit vector e_0 and the (tied) token embeddings' first column set to log p over the
value tokens, the value logits are exactly log p at every position, so p(x_t | x_<t, y) = p.

``pair_copy_tokens``: sequences of length L (even) for class y in {0, 1}: each even position is uniform over the two
tokens {2y, 2y + 1} (1 bit), each odd position repeats the token before it (0 bits). Entropy: 0.5 bits per token
given the class, and every sequence has exactly that -log2 p under the true model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmpipe.ar.model import ARPreset, LatentAR

SMALL = ARPreset(width=32, layers=2, heads=2)


def random_model(bins: int = 6, num_classes: int = 3, length: int = 12, seed: int = 0) -> LatentAR:
    """A randomly initialised tiny model in eval mode."""
    torch.manual_seed(seed)
    return LatentAR(bins, num_classes, length, SMALL).eval()


def known_distribution_model(log_probs: Tensor, num_classes: int = 2, length: int = 10) -> LatentAR:
    """A model with p(x_t | x_<t, y) = softmax(log_probs) at every position (see the module docstring)."""
    model = LatentAR(len(log_probs), num_classes, length, ARPreset(width=8, layers=1, heads=1)).eval()
    with torch.no_grad():
        final_norm = model.lm.transformer.ln_f
        final_norm.weight.zero_()
        final_norm.bias.zero_()
        final_norm.bias[0] = 1.0
        model.lm.transformer.wte.weight[: len(log_probs), 0] = log_probs
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight  # tied: the output rows are the embeddings
    return model


def pair_copy_tokens(n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(tokens (n, length), labels (n,)) from the pair-copy source (see the module docstring)."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    firsts = 2 * labels[:, None] + torch.randint(0, 2, (n, length // 2), generator=generator)
    return firsts.repeat_interleave(2, dim=1), labels


PAIR_COPY_BITS_PER_TOKEN = 0.5
