"""The base of every params section: frozen, unknown keys forbidden, no silent string-to-number coercion, every
number finite and every integer within 64 bits (what torch and numpy hold), seeds within 32 bits.

A section may be composed of parts (``ComposedSection``: the training loop's keys, the objective's keys) and still be
written flat in ``params.yaml``, so that ``dvc exp run -S train_ldm.lr=1e-4`` keeps working while the code passes
only ``config.loop`` to the loop. Names checked against a registry are ``one_of(registry)``: the allowed values come
from the registry, never from a list typed out again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

INT64_MAX = 2**63 - 1
# The error type of a part written as a key of its own (``train_vae: {loop: ...}``): located at that key, which
# is the one location inside a part that is not flattened away.
NESTED_PART_ERROR = "nested_part"
_BUILT_IN = frozenset(get_args(ErrorType))  # pydantic's own error types, raised again by name


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

    @classmethod
    def flat_fields(cls) -> dict[str, FieldInfo]:
        """The keys of ``params.yaml`` this section takes, with their fields."""
        return dict(cls.model_fields)

    def replace(self, **changes: Any) -> Section:
        """A validated copy with some keys changed, named as in ``params.yaml`` (``replace(steps=5)``)."""
        return type(self).model_validate({**self.model_dump(), **changes})


class ComposedSection(Section):
    """A section whose fields named in ``flat_parts`` are sections of their own, written flat in ``params.yaml``.

    Reading moves each part's keys into the part (``{"lr": 1e-3, "preset": "small"}`` -> ``{"loop": {"lr": 1e-3},
    "preset": "small"}``); dumping flattens them back, so ``model_dump()`` has the keys of ``params.yaml`` (what
    fingerprints name: ``train_ldm.lr``). Error locations are flattened by :mod:`gmpipe.config.params`; a part
    written as a key of its own is an error located at that key (:data:`NESTED_PART_ERROR`), raised together with
    every other problem of the section.
    """

    flat_parts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def flat_fields(cls) -> dict[str, FieldInfo]:
        """The keys of ``params.yaml`` this section takes, with their fields: its own, and each part's in its place."""
        fields = {key: field for key, field in cls.model_fields.items() if key not in cls.flat_parts}
        for part in cls.flat_parts:
            fields.update(cls.model_fields[part].annotation.model_fields)
        return fields

    @model_validator(mode="wrap")
    @classmethod
    def _nest_parts(cls, data: Any, handler: ModelWrapValidatorHandler) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        written = {part: data[part] for part in cls.flat_parts if part in data}
        data = {key: value for key, value in data.items() if key not in written}
        for part in cls.flat_parts:
            part_keys = cls.model_fields[part].annotation.model_fields
            data[part] = {key: data.pop(key) for key in list(data) if key in part_keys}
        if not written:
            return handler(data)
        # A part written as a key of its own is an error at that key; the rest of the section is still checked
        # without it, so one run names every problem.
        message = "unknown key (the {part} keys are written directly in the section)"
        errors = [InitErrorDetails(type=PydanticCustomError(NESTED_PART_ERROR, message, {"part": part}), loc=(part,),
                                   input=value) for part, value in written.items()]
        try:
            handler(data)
        except ValidationError as exc:
            errors += [_reraised(error) for error in exc.errors()]
        raise ValidationError.from_exception_data(cls.__name__, errors)

    @model_serializer(mode="wrap")
    def _flatten_parts(self, handler) -> dict[str, Any]:
        data = handler(self)
        for part in self.flat_parts:
            data.update(data.pop(part))
        return data


def _reraised(error: Any) -> InitErrorDetails:
    """One error of ``ValidationError.errors()`` as the details that raise it again, its type and context kept."""
    kind = PydanticCustomError(error["type"], error["msg"]) if error["type"] not in _BUILT_IN else error["type"]
    details = InitErrorDetails(type=kind, loc=tuple(error["loc"]), input=error["input"])
    if "ctx" in error and not isinstance(kind, PydanticCustomError):
        details["ctx"] = error["ctx"]
    return details


def one_of(names: Iterable[str]) -> Any:
    """The type of a params value that must be one of ``names`` (a registry's keys), in their order."""
    return Literal[tuple(names)]


def built_for(name: str, model: str, supported: tuple[str, ...]) -> str:
    """``name`` (a registered name, e.g. a conditioning) when ``model`` is built for it; else a ValueError whose one
    line says what it is built for (params report it as ``section.key: ...``)."""
    if name not in supported:
        raise ValueError(f"{model} is built for {' or '.join(supported)} only, not {name!r}")
    return name


Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(ge=1)]
# numpy's legacy seeding takes 32 bits, and the loop derives per-epoch torch seeds as seed * 1_000_003 + epoch,
# which must stay below 2**64.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Of networks that only run (encoding, sampling): float32 or bfloat16 autocast; auto: bf16 where the hardware computes
# it (gmpipe.precision.fast_bf16), resolved on the machine that runs the stage.
Precision = Literal["auto", "fp32", "bf16"]
