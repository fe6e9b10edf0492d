"""The whole ``params.yaml``: validation of every section, reported as one line per problem.

Validation runs before any compute. Files are read by :mod:`gmpipe.config.yaml_io` (YAML 1.2, as DVC reads them,
with bounded cost); :func:`load_params` turns every problem into one :class:`ParamsError` whose lines each name a
dotted key and the rule it broke, e.g. ``train_ldm.lr: must be > 0 (got -1)``. Every echoed value is cut short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gmpipe.config import yaml_io
from gmpipe.config.base import NESTED_PART_ERROR, Section
from gmpipe.config.cache_latents import CacheLatentsConfig
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.data import DataConfig
from gmpipe.config.distill import DistillConfig
from gmpipe.config.evaluate import EvaluateConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.config.train_ar import TrainARConfig
from gmpipe.config.train_decoder import TrainDecoderConfig
from gmpipe.config.train_gan import TrainGANConfig
from gmpipe.config.train_ldm import TrainLDMConfig
from gmpipe.config.train_vae import TrainVAEConfig
from gmpipe.errors import ParamsError

__all__ = ["Params", "ParamsError", "load_params", "parse_params", "parse_params_text"]


class Params(Section):
    data: DataConfig = DataConfig()
    compute: ComputeConfig = ComputeConfig()
    prepare: PrepareConfig = PrepareConfig()
    train_vae: TrainVAEConfig = TrainVAEConfig()
    cache_latents: CacheLatentsConfig = CacheLatentsConfig()
    train_decoder: TrainDecoderConfig = TrainDecoderConfig()
    train_ldm: TrainLDMConfig = TrainLDMConfig()
    distill: DistillConfig = DistillConfig()
    train_ar: TrainARConfig = TrainARConfig()
    train_gan: TrainGANConfig = TrainGANConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


_RULES = {
    "greater_than": lambda c: f"must be > {c['gt']}",
    "greater_than_equal": lambda c: f"must be >= {c['ge']}",
    "less_than": lambda c: f"must be < {c['lt']}",
    "less_than_equal": lambda c: f"must be <= {c['le']}",
    "literal_error": lambda c: f"must be one of {c['expected']}",
    "extra_forbidden": lambda c: "unknown key",
    "missing": lambda c: "required key is missing",
    "int_type": lambda c: "must be an integer",
    "float_type": lambda c: "must be a number",
    "finite_number": lambda c: "must be a finite number",
    "bool_type": lambda c: "must be true or false",
    "string_type": lambda c: "must be a string",
    "model_type": lambda c: "must be a mapping of keys to values",
    "model_attributes_type": lambda c: "must be a mapping of keys to values",
    "dict_type": lambda c: "must be a mapping of keys to values",
    "tuple_type": lambda c: "must be a list",
    "list_type": lambda c: "must be a list",
    "too_short": lambda c: f"must have at least {c['min_length']} item(s)",
    "too_long": lambda c: f"must have at most {c['max_length']} item(s)",
}
_WRONG_KIND = {"int_type", "float_type", "bool_type", "string_type", "model_type", "model_attributes_type",
               "dict_type", "tuple_type", "list_type"}


def _wrong_kind(error: dict[str, Any]) -> bool:
    """Whether the value is of the wrong kind (then the message names its kind: ``(got false, a boolean)``)."""
    if error["type"] == "literal_error":
        value = error["input"]
        return isinstance(value, bool) or isinstance(value, str) != ("'" in error["ctx"]["expected"])
    return error["type"] in _WRONG_KIND


def _flat_location(loc: tuple) -> tuple:
    """``("train_ldm", "loop", "lr")`` -> ``("train_ldm", "lr")``: a composed section's parts are written flat."""
    field = Params.model_fields.get(loc[0]) if loc else None
    parts = getattr(field.annotation, "flat_parts", ()) if field is not None else ()
    return loc[:1] + loc[2:] if len(loc) > 1 and loc[1] in parts else loc


def _describe(error: dict[str, Any]) -> str:
    location = tuple(error["loc"]) if error["type"] == NESTED_PART_ERROR else _flat_location(tuple(error["loc"]))
    rule = _RULES.get(error["type"])
    message = rule(error.get("ctx", {})) if rule else error["msg"].removeprefix("Value error, ")
    loc = ".".join(str(part) for part in location) or "(top level)"
    if error["type"] not in ("missing", "extra_forbidden") and "(got" not in message:
        value = error["input"]
        kind = f", {yaml_io.type_name(value)}" if _wrong_kind(error) and value is not None else ""  # null names itself
        message += f" (got {yaml_io.show(value)}{kind})"
    return f"{loc}: {message}"


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-parsed mapping (missing sections take their defaults); raise :class:`ParamsError`
    listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(source, [f"(top level): must be a mapping of sections (got {yaml_io.type_name(raw)})"])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
    raise ParamsError(source, [_describe(e) for e in errors])


def parse_params_text(text: str, source: str) -> Params:
    """Validate the text of a params file: YAML 1.2 as DVC reads it, and every section present, since DVC refuses
    to run a stage whose params section (``dvc.yaml``) is missing from the file."""
    raw = yaml_io.load(text, source)
    if raw is None:
        raise ParamsError(source, ["(top level): the file is empty; start from configs/smoke.yaml or the "
                                   "repository's params.yaml"])
    if isinstance(raw, dict):
        missing = [section for section in Params.model_fields if section not in raw]
        problems = [f"{section}: section is missing (DVC needs it; write `{section}: {{}}` for the defaults)"
                    for section in missing]
        try:
            params = parse_params(raw, source)
        except ParamsError as exc:
            raise ParamsError(source, problems + exc.all_problems) from None
        if problems:
            raise ParamsError(source, problems)
        return params
    return parse_params(raw, source)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every failure (unreadable file, bad YAML, bad values) is a ParamsError."""
    return parse_params_text(yaml_io.read_text(path), str(path))
