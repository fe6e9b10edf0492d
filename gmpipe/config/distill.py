"""``distill:`` few-step students of the trained denoiser, with the guidance weight folded in."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from gmpipe.config.base import ComposedSection, Precision, Section, one_of
from gmpipe.config.loop import LoopConfig
from gmpipe.registry import DETERMINISTIC_SAMPLERS, DISTILL_METHODS


class MethodLoop(Section):
    """One method's own ``steps`` and ``lr`` (``distill.method_loop.<method>``); a key left out is the section's."""

    steps: Annotated[int, Field(ge=1)] | None = None
    lr: Annotated[float, Field(gt=0.0, le=1.0)] | None = None


class DistillConfig(ComposedSection):
    """The loop's keys (``loop``) are written flat beside the distillation's own; ``steps`` is the number of
    optimizer steps per student (per round for progressive distillation). Which keys define which method's students
    is said by the method (``gmpipe.distill.methods``).

    Every student is a plain conditional copy of the teacher's architecture, initialised from the teacher (or,
    for progressive rounds after the first, from the previous student), distilled from the teacher guided at the
    fixed weight ``guidance``: one network evaluation per sampling step instead of two.
    """

    flat_parts = ("loop",)

    loop: LoopConfig = LoopConfig()
    methods: Annotated[list[one_of(DISTILL_METHODS)], Field(min_length=1)] = ["progressive", "reflow"]
    guidance: Annotated[float, Field(ge=0.0, le=50.0)] = 1.0
    time_shift: Annotated[float, Field(gt=0.0)] = 1.0
    progressive_start_steps: Annotated[int, Field(ge=1, le=1024)] = 16
    progressive_final_steps: Annotated[int, Field(ge=1, le=1024)] = 1
    reflow_pairs: Annotated[int, Field(ge=1)] = 20000
    reflow_sampler: one_of(DETERMINISTIC_SAMPLERS) = "heun"
    reflow_teacher_steps: Annotated[int, Field(ge=1, le=1000)] = 16
    reflow_precision: Precision = "fp32"  # of the teacher while it makes the couplings
    consistency_intervals: Annotated[int, Field(ge=2, le=1000)] = 16
    consistency_steps: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 2, 4]
    # per method, the loop's steps and lr where they differ from the section's (e.g. consistency: {steps: 200})
    method_loop: dict[one_of(DISTILL_METHODS), MethodLoop] = {}

    def method_changes(self, method: str) -> dict[str, int | float]:
        """The loop keys ``method_loop`` sets for ``method``: {key: value}, empty when it sets none."""
        changes = self.method_loop.get(method)
        return {} if changes is None else changes.model_dump(exclude_none=True)

    def loop_for(self, method: str) -> LoopConfig:
        """The loop ``method``'s students train with: the section's, with ``method_loop``'s keys for it."""
        return self.loop.replace(**self.method_changes(method))

    @model_validator(mode="after")
    def _rounds_halve(self):
        start, final = self.progressive_start_steps, self.progressive_final_steps
        if final > start or start % final or (start // final) & (start // final - 1):
            raise ValueError(
                "progressive_start_steps must be progressive_final_steps times a power of two "
                f"(got {start} and {final})"
            )
        return self
