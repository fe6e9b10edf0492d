"""Classifier-free guidance (Ho & Salimans 2022): condition dropout in training, guided prediction at sampling.

Guidance scale convention: pred = (1 + w) pred_cond - w pred_uncond, so w = 0 is the plain conditional
model (no guidance) and w = 1 doubles the conditional direction. (Some codebases use s = 1 + w.)

NFE counting: a guided call runs the network on the conditional and the unconditional batch together
(2B rows), which is 2 network evaluations per sample; GuidedModelFn.nfe_per_call says so and the samplers
multiply their call count by it. With w = 0 the unconditional pass is skipped and nfe_per_call is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gmpipe.batching import concat_rows
from gmpipe.diffusion.noise import standard_uniform

DenoiserFn = Callable[[Tensor, Tensor, Any], Tensor]  # denoiser_fn(x_t (B, ...), t (B,), cond) -> (B, ...)


def guided_prediction(pred_cond: Tensor, pred_uncond: Tensor, w: float) -> Tensor:
    """Ho & Salimans 2022, eq. 6: (1 + w) pred_cond - w pred_uncond. Valid for any target that is linear
    in (x, z) with the same coefficients for both predictions, so for every target here."""
    return (1 + w) * pred_cond - w * pred_uncond


class GuidedModelFn:
    """model_fn(x_t, t) -> guided prediction, for the samplers.

    Attributes: nfe_per_call (2, or 1 when w = 0) and calls (how many times it has been called).
    cond and null_cond have the same structure (tensor, tuple, list or dict of tensors) with the batch
    first; a null_cond tensor with batch 1 is expanded to cond's batch.
    """

    def __init__(self, denoiser_fn: DenoiserFn, cond: Any, null_cond: Any, w: float) -> None:
        self.denoiser_fn = denoiser_fn
        self.cond = cond
        self.w = w
        self.nfe_per_call = 1 if w == 0 else 2
        self.calls = 0
        # built once: the conditions do not change between sampler steps
        self._both_conds = None if w == 0 else concat_rows(cond, null_cond)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if self.w == 0:
            return self.denoiser_fn(x_t, t, self.cond)
        both = self.denoiser_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), self._both_conds)
        pred_cond, pred_uncond = both.chunk(2)
        return guided_prediction(pred_cond, pred_uncond, self.w)


def make_guided_model_fn(denoiser_fn: DenoiserFn, cond: Any, null_cond: Any, w: float) -> GuidedModelFn:
    """Wrap denoiser_fn(x_t, t, cond) into a guided model_fn(x_t, t) that evaluates cond and null_cond in
    one forward pass of 2B rows (cond first) and combines them with guided_prediction; w = 0 skips the
    unconditional half."""
    return GuidedModelFn(denoiser_fn, cond, null_cond, w)


def sample_drop_mask(
    batch_size: int,
    p_uncond: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B,) bool, True with probability p_uncond: which samples train unconditionally."""
    if not 0 <= p_uncond <= 1:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    return standard_uniform((batch_size,), generator=generator, device=device) < p_uncond


def drop_conditions(
    labels: Tensor,
    p_uncond: float,
    null_label: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class labels (B,) with each replaced by null_label with probability p_uncond (CFG training)."""
    drop = sample_drop_mask(labels.shape[0], p_uncond, generator=generator, device=labels.device)
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def drop_text_conditions(
    embeddings: Tensor,
    mask: Tensor,
    p_uncond: float,
    null_embedding: Tensor,
    null_mask: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Text conditions with whole captions replaced by the null caption with probability p_uncond.

    embeddings (B, L, D) token states, mask (B, L) attention mask; null_embedding (L, D) and null_mask (L,)
    (e.g. the encoding of the empty caption). Returns new (embeddings, mask); the inputs are not modified.
    """
    drop = sample_drop_mask(embeddings.shape[0], p_uncond, generator=generator, device=embeddings.device)
    new_embeddings = torch.where(drop[:, None, None], null_embedding.to(embeddings), embeddings)
    new_mask = torch.where(drop[:, None], null_mask.to(mask), mask)
    return new_embeddings, new_mask
