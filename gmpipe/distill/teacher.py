"""The teacher as the distillation losses see it: a model_fn(x_t, t) closure with the condition bound and
classifier-free guidance at a fixed weight w applied (gmpipe.diffusion.guidance: (1 + w) pred_cond -
w pred_uncond, cond and null cond in one 2B-row forward pass).

A teacher is a `denoiser_fn(x_t (B, ...), t (B,), cond) -> prediction` in its objective's target, e.g. a
frozen `gmpipe.nn.denoiser.Denoiser` (eval mode, requires_grad off, on the student's device). Its null
condition comes from `null_condition(batch_size, cond)`, e.g.
`lambda n, cond: denoiser.null_condition(n, like=cond)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gmpipe.diffusion.guidance import DenoiserFn, GuidedModelFn, make_guided_model_fn

NullCondition = Callable[[int, Any], Any]  # null_condition(batch_size, cond) -> the unconditional cond


def guided_teacher_fn(
    denoiser_fn: DenoiserFn, cond: Any, batch_size: int, w: float, null_condition: NullCondition | None
) -> GuidedModelFn:
    """model_fn(x_t, t) -> the teacher's prediction under cond, guided at w (w = 0: plain conditional, one
    network evaluation; no null_condition needed). cond: the batch's conditions (batch_size rows) or None."""
    if w == 0:
        return make_guided_model_fn(denoiser_fn, cond, None, 0.0)
    if null_condition is None:
        raise ValueError("a guided teacher (w != 0) needs null_condition")
    return make_guided_model_fn(denoiser_fn, cond, null_condition(batch_size, cond), w)
