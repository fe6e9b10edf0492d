"""Run a stage function with exactly the params it declares (``SECTIONS``), and nothing else.

``SECTIONS`` names whole sections (``"train_ldm"``: the typed section is passed) or single keys of one
(``"compute.device"``: only that value is passed), as the stage's ``params`` in dvc.yaml do, so that a change to
another key of that section does not rerun the stage."""

from __future__ import annotations

import importlib

from gmpipe.config.params import Params
from gmpipe.paths import Paths


def stage_module(stage: str):
    return importlib.import_module(f"gmpipe.stages.{stage}")


def declared_params(params: Params, name: str):
    """The section (``"train_ldm"``) or the single key (``"compute.device"``) ``name`` of ``params``."""
    value = params
    for part in name.split("."):
        value = getattr(value, part)
    return value


def run_stage_function(stage: str, params: Params, paths: Paths) -> dict:
    module = stage_module(stage)
    return module.run(*(declared_params(params, name) for name in module.SECTIONS), paths)


def needs_launcher(stage: str, params: Params) -> bool:
    """A training stage whose compute section asks for more than one process."""
    return "compute" in stage_module(stage).SECTIONS and params.compute.world_size > 1
