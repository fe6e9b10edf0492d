"""Run a stage function with exactly the params sections it declares (``SECTIONS``), and nothing else."""

from __future__ import annotations

import importlib

from gmpipe.config.params import Params
from gmpipe.paths import Paths


def stage_module(stage: str):
    return importlib.import_module(f"gmpipe.stages.{stage}")


def run_stage_function(stage: str, params: Params, paths: Paths) -> dict:
    module = stage_module(stage)
    return module.run(*(getattr(params, section) for section in module.SECTIONS), paths)


def needs_launcher(stage: str, params: Params) -> bool:
    """A training stage whose compute section asks for more than one process."""
    return "compute" in stage_module(stage).SECTIONS and params.compute.world_size > 1
