"""The prior trained through the shared loop on a source of known entropy: the loss falls to that entropy, with and
without the class, and the checkpoints (tied embeddings) resume."""

from __future__ import annotations

import pytest
import torch

from gmpipe.ar.likelihood import ar_loss_step, token_likelihood
from gmpipe.ar.model import ARPreset, LatentAR
from gmpipe.config.loop import LoopConfig
from gmpipe.train.loop import train

from .toys import PAIR_COPY_BITS_PER_TOKEN, pair_copy_tokens

LENGTH = 8
# Without the class the first token is uniform over 4 (2 bits), later even positions over the pair it fixed (1 bit),
# odd positions copy (0 bits): (2 + (L/2 - 1)) / L bits per token.
UNCONDITIONAL_BITS_PER_TOKEN = (2 + (LENGTH // 2 - 1)) / LENGTH


def test_training_reaches_the_entropy_of_the_source_and_resumes(tmp_path):
    tokens, labels = pair_copy_tokens(2048, LENGTH, torch.Generator().manual_seed(0))
    test_tokens, test_labels = pair_copy_tokens(2000, LENGTH, torch.Generator().manual_seed(1))
    config = LoopConfig(steps=250, batch_size=64, lr=0.01, lr_schedule="cosine", log_every=25, checkpoint_every=250,
                        ema_decay=0.9)

    def run():
        torch.manual_seed(0)
        model = LatentAR(bins=4, num_classes=2, sequence_length=LENGTH, preset=ARPreset(width=32, layers=2, heads=2))
        return train(config, [ar_loss_step(model, p_uncond=0.25)], len(tokens),
                     lambda index, device: (tokens[index].to(device), labels[index].to(device)), tmp_path / "ckpt",
                     ema_of="ar", description="ar toy")

    result = run()
    losses = [record["ar/bits_per_token"] for record in result.history]
    # Training batches drop the class a quarter of the time: their entropy is 3/4 0.5 + 1/4 0.625 = 0.53 bits per
    # token, from about 1 bit in the first interval.
    mixed_bits = 0.75 * PAIR_COPY_BITS_PER_TOKEN + 0.25 * UNCONDITIONAL_BITS_PER_TOKEN
    assert losses[0] > 0.9 and losses[-1] == pytest.approx(mixed_bits, abs=0.02)
    model = result.modules["ar"]
    # Under the true model every sequence costs exactly 0.5 bits per token (the draws are uniform over 2 tokens and
    # the copies certain), so a fitted model's test cross-entropy is 0.5 + KL >= 0.5 up to the sampling noise of a
    # near-uniform choice over 8000 draws (< 0.005 bits). The upper margin is the optimisation gap allowed after 250
    # steps (about 0.004 is reached).
    conditional = token_likelihood(model, test_tokens, test_labels).bits_per_token
    assert conditional == pytest.approx(PAIR_COPY_BITS_PER_TOKEN + 0.005, abs=0.015)
    # The null class (trained on a quarter of the batches) learns the unconditional source, 0.625 bits per token.
    unconditional = token_likelihood(model, test_tokens, None).bits_per_token
    assert unconditional == pytest.approx(UNCONDITIONAL_BITS_PER_TOKEN + 0.005, abs=0.015)

    again = run()  # resumes from the final checkpoint: no step runs, the tied weights load back
    assert again.resumed_from == 250
    assert token_likelihood(again.modules["ar"], test_tokens, test_labels).bits_per_token == pytest.approx(
        conditional, rel=1e-9)
