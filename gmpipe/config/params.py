"""The whole ``params.yaml``: validation of every section, reported as one line per problem.

Validation runs before any compute; :func:`load_params` turns all problems into one :class:`ParamsError` whose
lines each name a dotted key and the rule it broke, e.g. ``train_ldm.lr: must be > 0 (got -1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gmpipe.config.base import Section
from gmpipe.config.cache_latents import CacheLatentsConfig
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.data import DataConfig
from gmpipe.config.distill import DistillConfig
from gmpipe.config.evaluate import EvaluateConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.config.train_ldm import TrainLDMConfig
from gmpipe.config.train_vae import TrainVAEConfig


class Params(Section):
    data: DataConfig = DataConfig()
    compute: ComputeConfig = ComputeConfig()
    prepare: PrepareConfig = PrepareConfig()
    train_vae: TrainVAEConfig = TrainVAEConfig()
    cache_latents: CacheLatentsConfig = CacheLatentsConfig()
    train_ldm: TrainLDMConfig = TrainLDMConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


class ParamsError(Exception):
    """Invalid params; ``problems`` holds one ``dotted.key: rule (got value)`` line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


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
    "bool_type": lambda c: "must be true or false",
    "string_type": lambda c: "must be a string",
    "model_type": lambda c: "must be a mapping of keys to values",
    "model_attributes_type": lambda c: "must be a mapping of keys to values",
    "tuple_type": lambda c: "must be a list",
    "list_type": lambda c: "must be a list",
}


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
    rule = _RULES.get(error["type"])
    message = rule(error.get("ctx", {})) if rule else error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("missing", "extra_forbidden") and "(got" not in message:
        message += f" (got {error['input']!r})"
    return f"{loc}: {message}"


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-parsed mapping; raise :class:`ParamsError` listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(source, [f"(top level): must be a mapping of sections (got {type(raw).__name__})"])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(source, [_describe(e) for e in exc.errors()]) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every failure (missing file, bad YAML, bad values) is a ParamsError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ParamsError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return parse_params(raw, str(path))
