"""The base of every params section: frozen, unknown keys forbidden, no silent string-to-number coercion, every
number finite and every integer within 64 bits (what torch and numpy hold), seeds within 32 bits."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MAX = 2**63 - 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _integers_fit_in_64_bits(cls, value: Any) -> Any:
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and not -INT64_MAX - 1 <= item <= INT64_MAX:
                raise ValueError(f"must fit in 64 bits, -2**63 to 2**63 - 1 (got an integer of {item.bit_length()} "
                                 "bits)")
        return value

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(ge=1)]
# numpy's legacy seeding takes 32 bits, and the loop derives per-epoch torch seeds as seed * 1_000_003 + epoch,
# which must stay below 2**64.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
