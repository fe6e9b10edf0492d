"""``prepare:`` splits and limits."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from gmpipe.config.base import Fraction, Section, Seed


class PrepareConfig(Section):
    """``val_fraction`` is carved from the training images (seeded, per class). ``test_fraction`` applies only to
    ``image_folder`` sources; Fashion-MNIST keeps its official test split. ``max_per_class`` caps each split per
    class (smoke runs); ``null`` keeps everything. Transparent pixels are composited on grey ``alpha_background``.
    """

    seed: Seed = 0
    val_fraction: Fraction = 0.05
    test_fraction: Fraction = 0.1
    max_per_class: Annotated[int, Field(ge=1)] | None = None
    alpha_background: Annotated[int, Field(ge=0, le=255)] = 255

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> PrepareConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must be < 0.9 (got {self.val_fraction + self.test_fraction:g})"
            )
        return self
