"""One Prefect flow per stage. Each loads only its own params sections and calls the plain stage function."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from gmpipe.config.params import Params, ParamsError, load_params
from gmpipe.errors import GmpipeError
from gmpipe.launch import accelerate_command
from gmpipe.paths import Paths
from gmpipe.rendezvous import machine_rank
from gmpipe.stages import STAGES
from gmpipe.stages.runner import needs_launcher, run_stage_function


def launch_stage(stage: str, params: Params, params_file: str, root: str) -> dict:
    """Run this machine's share of a training stage on ``compute.world_size`` processes through ``accelerate
    launch``, streaming its output; returns rank 0's summary (on the other machines: which machine this was)."""
    rank = machine_rank(params.compute.num_machines)
    with tempfile.TemporaryDirectory() as scratch:
        summary_file = str(Path(scratch) / "summary.json")
        command, env = accelerate_command(params.compute, stage, params_file, root, summary_file, rank)
        compute = params.compute
        where = f" on machine {rank} of {compute.num_machines}" if compute.num_machines > 1 else ""
        print(f"launching {compute.num_processes} of {compute.world_size} processes{where}: {' '.join(command)}",
              flush=True)
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        error = None  # the last `gmpipe: error:` line of any rank, however much output followed it
        for line in process.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line])[-20:]
            if "gmpipe: error:" in line:
                error = line.split("gmpipe: error:", 1)[1].strip()
        if process.wait() != 0:
            raise GmpipeError(error or
                              f"accelerate launch exited with code {process.returncode}: {''.join(tail[-3:]).strip()}")
        if rank != 0:
            return {"machine_rank": rank, "wrote": "nothing: machine 0 writes the outputs"}
        return json.loads(Path(summary_file).read_text())


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
            if needs_launcher(stage, params):
                summary = launch_stage(stage, params, params_file, root)
            else:
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
