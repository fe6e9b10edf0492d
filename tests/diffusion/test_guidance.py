"""Classifier-free guidance: the combination, the batched wrapper and its NFE, condition dropout."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import drop_conditions, drop_text_conditions, guided_prediction, make_guided_model_fn

B = 4


class RecordingDenoiser:
    """denoiser(x_t, t, labels) = x_t * (1 + labels) + t: conditional and unconditional outputs differ."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x_t, t, labels):
        self.batch_sizes.append(x_t.shape[0])
        return x_t * (1 + labels[:, None]) + t[:, None]


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, generator=generator), torch.rand(B, generator=generator)


def test_guided_prediction_formula():
    cond, uncond = torch.tensor([2.0]), torch.tensor([0.5])
    assert guided_prediction(cond, uncond, 0.0) == cond
    torch.testing.assert_close(guided_prediction(cond, uncond, 3.0), torch.tensor([4 * 2.0 - 3 * 0.5]))


def test_zero_scale_is_the_conditional_model_in_one_pass():
    x_t, t = _inputs()
    labels = torch.arange(B, dtype=torch.float32)
    denoiser = RecordingDenoiser()
    guided = make_guided_model_fn(denoiser, labels, torch.zeros(B), w=0.0)
    prediction = guided(x_t, t)
    assert denoiser.batch_sizes == [B] and guided.nfe_per_call == 1
    torch.testing.assert_close(prediction, denoiser(x_t, t, labels))


def test_positive_scale_batches_cond_and_uncond_in_one_pass():
    x_t, t = _inputs()
    labels, null = torch.arange(B, dtype=torch.float32), torch.full((B,), -0.5)
    denoiser = RecordingDenoiser()
    guided = make_guided_model_fn(denoiser, labels, null, w=1.5)
    prediction = guided(x_t, t)
    assert denoiser.batch_sizes == [2 * B] and guided.nfe_per_call == 2 and guided.calls == 1
    expected = guided_prediction(denoiser(x_t, t, labels), denoiser(x_t, t, null), 1.5)
    torch.testing.assert_close(prediction, expected)


def test_structured_text_conditions_and_a_broadcast_null():
    x_t, t = _inputs()
    embeddings, mask = torch.randn(B, 5, 8), torch.ones(B, 5, dtype=torch.bool)
    null_embeddings, null_mask = torch.zeros(1, 5, 8), torch.zeros(1, 5, dtype=torch.bool)

    def denoiser(x_t, t, cond):
        embeddings, mask = cond
        pooled = (embeddings * mask[..., None]).sum((1, 2))
        return x_t + pooled[:, None]

    guided = make_guided_model_fn(denoiser, (embeddings, mask), (null_embeddings, null_mask), w=2.0)
    expected = guided_prediction(x_t + (embeddings.sum((1, 2)))[:, None], x_t, 2.0)
    torch.testing.assert_close(guided(x_t, t), expected)


def test_drop_conditions_rates_and_reproducibility():
    labels = torch.arange(10_000) % 10
    kept = drop_conditions(labels, 0.0, null_label=10)
    assert torch.equal(kept, labels)
    assert (drop_conditions(labels, 1.0, null_label=10) == 10).all()
    dropped = drop_conditions(labels, 0.2, null_label=10, generator=torch.Generator().manual_seed(0))
    assert (dropped == 10).float().mean().item() == pytest.approx(0.2, abs=0.02)
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    again = drop_conditions(labels, 0.2, null_label=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    assert torch.equal(labels, torch.arange(10_000) % 10)  # input untouched
    with pytest.raises(ValueError, match="p_uncond"):
        drop_conditions(labels, 1.5, null_label=10)


def test_drop_text_conditions_replaces_whole_captions():
    generator = torch.Generator().manual_seed(0)
    embeddings, mask = torch.randn(64, 6, 4, generator=generator), torch.ones(64, 6, dtype=torch.bool)
    null_embedding, null_mask = torch.zeros(6, 4), torch.tensor([True] + [False] * 5)
    new_embeddings, new_mask = drop_text_conditions(
        embeddings, mask, 0.5, null_embedding, null_mask, generator=torch.Generator().manual_seed(1)
    )
    dropped = (new_embeddings == 0).all(dim=(1, 2))
    assert 0 < dropped.sum() < 64
    assert torch.equal(new_mask[dropped], null_mask.expand(int(dropped.sum()), 6))
    assert torch.equal(new_embeddings[~dropped], embeddings[~dropped])
    assert torch.equal(new_mask[~dropped], mask[~dropped])
