"""One Prefect flow per stage. Each loads only its own params sections and calls the plain stage function."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from gmpipe.config.params import Params, ParamsError, load_params
from gmpipe.errors import GmpipeError
from gmpipe.paths import Paths
from gmpipe.stages import STAGES


def run_stage_function(stage: str, params: Params, paths: Paths) -> dict:
    """Call ``gmpipe.stages.<stage>.run`` with the params sections it declares, and nothing else."""
    module = importlib.import_module(f"gmpipe.stages.{stage}")
    return module.run(*(getattr(params, section) for section in module.SECTIONS), paths)


def summary_markdown(stage: str, summary: dict) -> str:
    """A short human summary: what the stage read and wrote, counts, and anything it rejected."""
    lines = [f"## {stage}", ""]
    for key in ("read", "wrote"):
        if key in summary:
            value = summary[key]
            lines.append(f"- **{key}**: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    for key, value in summary.items():
        if key in ("read", "wrote", "rejected", "markdown"):
            continue
        lines.append(f"- **{key}**: `{json.dumps(value)}`")
    if summary.get("markdown"):
        lines += ["", summary["markdown"]]
    rejected = summary.get("rejected") or []
    if rejected:
        lines += ["", f"### Rejected inputs ({len(rejected)})", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{r['file']}` | {r['reason']} |" for r in rejected[:200]]
        if len(rejected) > 200:
            lines.append(f"| ... | {len(rejected) - 200} more in the rejected file |")
    return "\n".join(lines)


def _make_flow(stage: str):
    @flow(name=stage, log_prints=True, validate_parameters=False)
    def stage_flow(params_file: str = "params.yaml", root: str = "."):
        try:
            params = load_params(Path(root) / params_file)
            summary = run_stage_function(stage, params, Paths(Path(root)))
        except (GmpipeError, ParamsError, FileNotFoundError) as exc:
            return Failed(message=str(exc))
        create_markdown_artifact(
            key=stage.replace("_", "-"), markdown=summary_markdown(stage, summary), description=f"{stage} summary"
        )
        return summary

    return stage_flow


STAGE_FLOWS = {stage: _make_flow(stage) for stage in STAGES}


def run_stage(stage: str, params_file: str = "params.yaml", root: str = "."):
    """Run one stage flow; return its final Prefect state (never raises for a user error)."""
    return STAGE_FLOWS[stage](params_file=params_file, root=root, return_state=True)
