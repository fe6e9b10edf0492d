"""One Prefect flow per stage. Each loads only its own params sections and calls the plain stage function.

Training progress reaches the run as a progress artifact per training job and one log line per log interval.
Started by the pipeline (``dvc repro`` in one of its tasks), a stage's flow run is created as a child of that task
run, so the Prefect UI shows it inside the pipeline run.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.states import Failed
from tqdm import tqdm

from flows.environment import PARENT_TASK_RUNS
from flows.heartbeats import engine_heartbeats_off, flow_run_heartbeats
from flows.processes import own_memory_kib, run_streaming
from gmpipe.config.params import Params, ParamsError, load_params
from gmpipe.errors import GmpipeError
from gmpipe.launch import accelerate_command
from gmpipe.paths import Paths
from gmpipe.rendezvous import machine_rank
from gmpipe.stages import STAGES
from gmpipe.stages.runner import needs_launcher, run_stage_function
from gmpipe.train.progress import ProgressEvent, listening


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
        code, lines = run_streaming(command, lambda line: print(line, flush=True), env=env)
        if code != 0:
            # The last `gmpipe: error:` line of any rank, however much output followed it.
            errors = [line.strip() for line in lines if "gmpipe: error:" in line]
            raise GmpipeError(errors[-1].split("gmpipe: error:", 1)[1].strip() if errors else
                              f"accelerate launch exited with code {code}: {' '.join(lines[-3:]).strip()}")
        if rank != 0:
            return {"machine_rank": rank, "wrote": "nothing: machine 0 writes the outputs"}
        return json.loads(Path(summary_file).read_text())


class ProgressToPrefect:
    """A :mod:`gmpipe.train.progress` listener for a stage's flow run: per training job (an event's
    ``description``), a progress artifact created at its first event and updated at each later one, and one log line
    per event (the loop reports once per log interval)."""

    def __init__(self):
        self.logger = get_run_logger()
        self.artifacts: dict[str, uuid.UUID] = {}

    def __call__(self, event: ProgressEvent) -> None:
        percent = round(100.0 * event.fraction, 1)
        artifact = self.artifacts.get(event.description)
        if artifact is None:
            self.artifacts[event.description] = create_progress_artifact(
                percent, description=f"{event.description}: {event.total} steps")
        else:
            update_progress_artifact(artifact, percent)
        metrics = "".join(f", {name} {value:.4g}" for name, value in event.metrics.items())
        # A bar on the same stream would run into the line: tqdm clears it and draws it again below.
        with tqdm.external_write_mode(file=sys.stderr):
            self.logger.info(f"{event.description}: step {event.done}/{event.total} ({percent:g}%){metrics}")


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


RESOURCES_LINE = "gmpipe: stage {stage} took {seconds} s, peak memory {peak_memory_mib} MiB"
# Set in a stage forked by the pipeline's stage server (flows.stage_server): its resident memory at the fork, pages
# shared with the server (every stage's imports) that its peak memory counts too.
FORKED_AT_MIB: int | None = None


def resources_line(stage: str, resources: dict) -> str:
    """The one line a stage prints when it is done; the pipeline reads it from DVC's output for its table."""
    line = RESOURCES_LINE.format(stage=stage, **resources)
    if resources.get("forked_at_mib") is not None:
        line += f" (forked by the stage server at {resources['forked_at_mib']} MiB)"
    return line


def peak_memory_mib() -> int:
    """Peak resident memory of this process, or of its largest finished child (the ``accelerate launch`` workers of a
    multi-process stage), in MiB: the high-water mark the kernel kept, not a sample."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    own = own_memory_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(max(own, children) / 1024)


@functools.cache
def stage_flow(stage: str):
    """The flow of ``stage``, made when first asked for: a process runs one stage, and each flow costs a few ms."""

    @flow(name=stage, log_prints=True, validate_parameters=False)
    def run_flow(params_file: str = "params.yaml", root: str = "."):
        # Run through run_stage, the flow run's heartbeats are gmpipe's, sent from inside the run (flows.heartbeats).
        with flow_run_heartbeats():
            return _stage_in_flow_run(stage, params_file, root)

    return run_flow


def _stage_in_flow_run(stage: str, params_file: str, root: str):
    """The body of a stage's flow: the stage's summary (also as a markdown artifact), or a Failed state for a user
    error."""
    start = time.perf_counter()
    try:
        params = load_params(Path(root) / params_file)
        if needs_launcher(stage, params):
            summary = launch_stage(stage, params, params_file, root)
        else:
            with listening(ProgressToPrefect()):
                summary = run_stage_function(stage, params, Paths(Path(root)))
    except (GmpipeError, ParamsError, FileNotFoundError) as exc:
        return Failed(message=str(exc))
    summary["resources"] = {"seconds": round(time.perf_counter() - start, 3), "peak_memory_mib": peak_memory_mib(),
                            "forked_at_mib": FORKED_AT_MIB}
    print(resources_line(stage, summary["resources"]), flush=True)
    create_markdown_artifact(
        key=stage.replace("_", "-"), markdown=summary_markdown(stage, summary), description=f"{stage} summary"
    )
    return summary


def run_stage(stage: str, params_file: str = "params.yaml", root: str = "."):
    """Run one stage flow; return its final Prefect state (never raises for a user error). Under the pipeline
    (``GMPIPE_PREFECT_PARENT_TASK_RUNS`` names a task run for this stage), the flow run is that task run's child."""
    from prefect.context import SyncClientContext
    from prefect.flow_engine import run_flow_sync
    from prefect.states import Pending

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    the_flow = stage_flow(stage)
    parameters = {"params_file": params_file, "root": root}
    # One API client for creating the flow run and for the engine that runs it (the engine takes the one in context):
    # a second one would load its TLS certificates and ask the server for its version again.
    with SyncClientContext.get_or_create() as context:
        client = context.client
        # The flow run is created here rather than by calling the flow: that path serializes the parameters with
        # FastAPI's encoder, whose import alone costs 0.3 s per stage, for two strings.
        flow_run = client.create_flow_run(the_flow, parameters=parameters, state=Pending(),
                                          parent_task_run_id=_parent_task_run(stage, client))
        with engine_heartbeats_off():
            return run_flow_sync(the_flow, flow_run=flow_run, parameters=parameters, return_type="state")


def _parent_task_run(stage: str, client) -> uuid.UUID | None:
    """The pipeline's task run for ``stage`` named by the environment, if it exists on the API in use (a value
    inherited from elsewhere, e.g. a shell that ran the pipeline, is ignored with a note)."""
    value = os.environ.get(PARENT_TASK_RUNS, "").strip()
    if not value:
        return None
    from prefect.exceptions import ObjectNotFound

    try:
        parent = uuid.UUID(json.loads(value)[stage])
        client.read_task_run(parent)
    except (ValueError, TypeError, KeyError, ObjectNotFound):
        print(f"gmpipe: {PARENT_TASK_RUNS}={value!r} names no task run of stage '{stage}' on this Prefect API; "
              "running the stage as a flow run of its own", file=sys.stderr)
        return None
    return parent
