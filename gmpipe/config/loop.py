"""Settings of the one training loop: the part of every training section (``train_vae``, ``train_ldm``, ``distill``)
that reaches the loop and its checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from gmpipe.config.base import PositiveInt, Section, Seed

# Keys that say how long, how often or how a run is computed, not what it computes: a checkpoint written under
# other values of these is still this run's, so raising ``steps`` continues it (gmpipe.fingerprint), where the
# learning rate does not depend on ``steps`` (resumable_keys).
RESUMABLE_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "grad_accum", "compile",
                  "gradient_checkpointing", "channels_last", "nonfinite")


class LoopConfig(Section):
    """Optimisation, EMA, checkpointing and logging; a training section composes it with its model and loss keys.

    ``batch_size`` is the global batch of one optimizer step (split over processes and ``grad_accum`` micro-batches).
    """

    seed: Seed = 0
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    grad_accum: PositiveInt = 1
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    clip_grad_norm: Annotated[float, Field(gt=0.0)] | None = 1.0
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    ema_warmup: bool = True
    checkpoint_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 50
    compile: bool = False
    gradient_checkpointing: bool = False
    # 4-D weights and the activations of the convolutions that read them in channels-last layout: the same math,
    # often faster convolutions on GPUs with tensor cores; the saved weights are in PyTorch's default layout. Off by
    # default: on the 2-core CPU the demo's bf16 train_vae step ran at 0.83x the default layout (its GroupNorms take
    # PyTorch's slow channels-last kernel); the demo's train_gan turns it on (1.20x; python -m bench.conv_layout).
    channels_last: bool = False
    nonfinite: Literal["stop", "skip"] = "stop"

    @model_validator(mode="after")
    def _batch_splits_evenly(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size must be divisible by grad_accum (got {self.batch_size} and {self.grad_accum})"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be <= steps (got {self.warmup_steps} > {self.steps})")
        return self


def resumable_keys(loop: LoopConfig) -> tuple[str, ...]:
    """The keys of ``RESUMABLE_KEYS`` a checkpoint may differ in and still be this run's. ``steps`` is one only under
    a constant learning rate: a cosine or linear schedule spreads its decay over ``steps``, so step k of a run of
    other length trained at other rates than step k of this one, and continuing it would return a model that no
    fresh run of these settings makes (nor ``dvc repro`` in a fresh clone). Such a run starts over, naming ``steps``."""
    if loop.lr_schedule == "constant":
        return RESUMABLE_KEYS
    return tuple(key for key in RESUMABLE_KEYS if key != "steps")
