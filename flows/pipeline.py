"""The whole pipeline as one Prefect flow: one ``dvc repro`` of the chosen stages, so DVC decides what is up to date,
with a Prefect task run per stage that follows that stage through DVC's output (the stage's own flow run is its
child).

A run holds the workspace lock for its whole length (two runs on one workspace would otherwise race on
``params.yaml``, ``dvc.lock`` and the outputs, and DVC's own repo lock makes the second ``dvc repro`` fail rather
than wait). When a DVC remote is configured, the run pulls from it first and pushes to it after the stages.

A run that succeeds also writes ``reports/pipeline_run.json`` (:data:`RUN_RECORD`): per stage its outcome, wall
time in ``dvc repro``, own time and peak memory, with the date, the code version and the load average before and
after, which ``python -m bench`` tabulates (``bench.demo_stages``). It is no DVC output (git-ignored, as
``reports/bench.json``): a record of this run on this machine, not a result of the stages.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Cancelled, Crashed, Failed, State
from prefect.task_engine import run_task_sync

from flows.environment import PARENT_TASK_RUNS
from flows.overrides import restore_after_killed_run
from flows.processes import run_streaming
from flows.stage_client import stage_server

WORKSPACE_LOCK = Path(".dvc") / "tmp" / "gmpipe-workspace.lock"
RUN_RECORD = Path("reports") / "pipeline_run.json"
REMOTE_ENV = "GMPIPE_DVC_REMOTE"
ENV_REMOTE_NAME = "gmpipe"

# Workspaces whose lock this call chain already holds, so that a deployment flow can take the lock, rewrite
# params.yaml and then call the pipeline flow (which takes it again) without waiting on itself.
_held_locks: ContextVar[frozenset[str]] = ContextVar("gmpipe_held_workspace_locks", default=frozenset())


def _holder_description() -> str:
    from prefect.runtime import flow_run

    run_name = flow_run.name
    who = f"flow run '{run_name}' " if run_name else ""
    return f"{who}(pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"


@contextlib.contextmanager
def workspace_lock(root: str | Path = ".", log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``ROOT/.dvc/tmp/gmpipe-workspace.lock`` while the block runs.

    A second holder (another process, or another thread: ``flock`` locks belong to the open file) waits and logs
    who it waits for. Re-entrant within one call chain. The kernel drops the lock when its holder dies, so a killed
    run never leaves the workspace locked, and the next holder puts back a ``params.yaml`` that a killed deployment
    run left with its overrides (:func:`flows.overrides.restore_after_killed_run`). ``log`` defaults to ``print``
    as called, so inside a flow with ``log_prints`` the wait shows in the run's log.
    """
    log = log or print
    key = str(Path(root).resolve())
    if key in _held_locks.get():
        yield
        return
    path = Path(key) / WORKSPACE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another run"
            log(f"workspace {key} is in use by {holder}; waiting for it to finish")
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log(f"workspace {key} is free after {time.monotonic() - started:.1f} s; starting")
        handle.seek(0)
        handle.truncate()
        handle.write(_holder_description() + "\n")
        handle.flush()
        token = _held_locks.set(_held_locks.get() | {key})
        try:
            restore_after_killed_run(key, log)
            yield
        finally:
            _held_locks.reset(token)
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def dvc_stage_order(root: str | Path = ".") -> list[str]:
    """Stage names in the order ``dvc.yaml`` lists them (written in dependency order)."""
    with open(Path(root) / "dvc.yaml") as handle:
        return list(yaml.safe_load(handle)["stages"])


def _dvc_environment(parent_task_runs: dict[str, uuid.UUID] | None = None) -> dict[str, str]:
    """This interpreter's scripts folder first on PATH: a worker started as ``.venv/bin/prefect worker start``
    without an activated venv still finds ``dvc`` and the ``gmpipe`` command that dvc.yaml runs. With
    ``parent_task_runs`` (stage -> task run id), so that the stage flow ``dvc`` starts becomes a child of its stage's
    task run."""
    scripts = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=os.pathsep.join([scripts, os.environ.get("PATH", os.defpath)]))
    env.pop(PARENT_TASK_RUNS, None)
    if parent_task_runs:
        env[PARENT_TASK_RUNS] = json.dumps({stage: str(run_id) for stage, run_id in parent_task_runs.items()})
    return env


class DvcFailed(RuntimeError):
    """A dvc command exited non-zero; the message is the one line that says why."""

    def __init__(self, what: str, code: int, reason: str):
        super().__init__(f"{what} failed (exit {code}): {reason}")
        self.code, self.reason = code, reason


def run_dvc(arguments: list[str], root: str | Path, on_line: Callable[[str], None] | None = None,
            env: dict[str, str] | None = None) -> list[str]:
    """Run ``dvc ARGUMENTS`` in ``root``, its output into the flow log one finished line at a time (a progress
    bar's redraws make one line) and to ``on_line``; raise :class:`DvcFailed` on failure. An interrupt stops dvc and
    its stage first. ``env``: dvc's environment (default: ``_dvc_environment()``)."""
    command = ["dvc", *arguments]
    print(f"$ {' '.join(command)}", flush=True)

    def relay(line: str) -> None:
        print(line, flush=True)
        if on_line is not None:
            on_line(line)

    code, lines = run_streaming(command, relay, cwd=root, env=env or _dvc_environment())
    if code != 0:
        raise DvcFailed(' '.join(command), code, _failure_reason(lines))
    return lines


def _failure_reason(lines: list[str]) -> str:
    """The stage's own error line (``gmpipe: error: ...``), else DVC's (``ERROR: ...``), else the last line."""
    for marker in ("gmpipe: error: ", "ERROR: "):
        found = [line.split(marker, 1)[1].strip() for line in lines if marker in line]
        if found:
            return found[-1]
    return lines[-1].strip() if lines else "no output"


def dvc_remote(root: str | Path = ".") -> str | None:
    """The DVC remote a run syncs with, or None.

    ``GMPIPE_DVC_REMOTE`` (a folder, relative to the workspace, or any URL DVC understands) wins: it is written to
    the git-ignored ``.dvc/config.local`` as remote ``gmpipe``. Otherwise DVC's default remote (``dvc remote add
    -d``, at any config level) is used.
    """
    url = os.environ.get(REMOTE_ENV, "").strip()
    if url:
        if "://" not in url:
            url = str((Path(root) / Path(url).expanduser()).resolve())
        run_dvc(["remote", "add", "--local", "--force", ENV_REMOTE_NAME, url], root)
        return ENV_REMOTE_NAME
    # DVC's own config reader (every level, as `dvc remote default` reads them), in this process: a `dvc` command
    # would cost a second (mostly DVC's imports) on every run, remote or not.
    from dvc.config import Config, ConfigError

    try:
        return Config(dvc_dir=str(Path(root) / ".dvc"))["core"].get("remote") or None
    except ConfigError as exc:
        raise DvcFailed("reading DVC's config", 1, str(exc)) from None


@task(name="dvc-pull", task_run_name="dvc pull -r {remote}")
def pull_outputs(remote: str, root: str = ".") -> None:
    """Fetch the outputs ``dvc.lock`` names from the remote; what the remote lacks (a first run) is not an error."""
    run_dvc(["pull", "--allow-missing", "--remote", remote], root)


@task(name="dvc-push", task_run_name="dvc push -r {remote}")
def push_outputs(remote: str, root: str = ".") -> None:
    """Upload every cached output ``dvc.lock`` names to the remote."""
    run_dvc(["push", "--remote", remote], root)


# DVC's lines for a stage of `dvc repro` (3.x): it runs, it is up to date (or its outputs come from the run cache),
# or it is frozen (`dvc freeze`: its outputs are checked, it never runs).
STAGE_RAN = re.compile(r"^Running stage '([^']+)':")
STAGE_UP_TO_DATE = re.compile(r"^Stage '([^']+)' (?:didn't change, skipping|is cached - skipping)")
STAGE_FROZEN = re.compile(r"^Verifying outputs in frozen stage: '([^']+)'")
# What `gmpipe stage` prints when done (flows.stages.RESOURCES_LINE), possibly behind a log prefix.
STAGE_RESOURCES = re.compile(r"gmpipe: stage (\w+) took ([\d.]+) s, peak memory (\d+) MiB"
                             r"(?: \(forked by the stage server at (\d+) MiB\))?")


class ReproProgress:
    """What one ``dvc repro`` of several stages says, in order: ``("stage", "ran" | "up to date" | "frozen", name)``
    for each stage it starts or skips, then ``("exit", code, reason)`` once dvc has exited, or ``("interrupted",)``.
    Fed from dvc's output (:meth:`read_line`), read by the stage task runs (:meth:`next`)."""

    def __init__(self):
        self._events: queue.Queue[tuple] = queue.Queue()
        self._held: tuple | None = None
        # stage -> (its own seconds, peak memory MiB, resident MiB when the stage server forked it or None)
        self.resources: dict[str, tuple[float, int, int | None]] = {}

    def read_line(self, line: str) -> None:
        if match := STAGE_RESOURCES.search(line):
            forked_at = None if match.group(4) is None else int(match.group(4))
            self.resources[match.group(1)] = (float(match.group(2)), int(match.group(3)), forked_at)
        if match := STAGE_RAN.match(line):
            self._events.put(("stage", "ran", match.group(1)))
        elif match := STAGE_UP_TO_DATE.match(line):
            self._events.put(("stage", "up to date", match.group(1)))
        elif match := STAGE_FROZEN.match(line):
            self._events.put(("stage", "frozen", match.group(1)))

    def exited(self, code: int, reason: str | None = None) -> None:
        self._events.put(("exit", code, reason))

    def interrupted(self) -> None:
        self._events.put(("interrupted",))

    def next(self) -> tuple:
        event, self._held = self._held or self._events.get(), None
        return event

    def put_back(self, event: tuple) -> None:
        """The next :meth:`next` returns ``event`` again (it belongs to the stage after)."""
        self._held = event


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)
def follow_stage(stage: str, progress: ReproProgress) -> str | State:
    """``stage`` inside the pipeline's one ``dvc repro``: from the line where dvc starts it (or says it is up to date)
    until dvc moves on to the next stage or exits. DVC stops at the first stage that fails, so moving on means this
    one succeeded. A failure is a Failed state with the one line that says why (the stage's own run holds the
    details), not a traceback."""
    event = progress.next()
    if event[0] != "stage":
        progress.put_back(event)
        if event[0] == "interrupted":
            return Cancelled(message="not run: the pipeline was interrupted")
        _, code, reason = event  # e.g. a missing dependency: DVC refuses the stage before it starts
        return Failed(message=f"dvc repro failed (exit {code}): {reason}" if code else
                      "dvc repro finished without running or skipping this stage")
    _, outcome, name = event
    if name != stage:
        return Failed(message=f"dvc reported stage '{name}' where '{stage}' was due")
    if outcome != "ran":
        return outcome
    after = progress.next()
    progress.put_back(after)
    if after[0] == "interrupted":
        return Crashed(message="the pipeline was interrupted while this stage ran")
    if after[0] == "stage" or after[1] == 0:  # dvc moved on to the next stage, or finished
        return "ran"
    return Failed(message=f"dvc repro failed (exit {after[1]}): {after[2]}")


def repro_stages(stages: list[str], root: str = ".", force: bool = False) -> dict[str, StageOutcome] | State:
    """``dvc repro --single-item STAGE...`` once, ``stages`` in dependency order (DVC runs single-item targets in the
    order given), with a task run per stage created before dvc starts, so that each stage's flow run can be its
    child. Returns each stage's outcome, or a Failed state naming the first stage that failed; stages after it are
    marked Cancelled (not run), and after an interrupt the stage that ran is marked Crashed."""
    flow_run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        task_runs = {stage: client.create_task_run(follow_stage, flow_run.id, dynamic_key=stage,
                                                   name=f"dvc repro {stage}") for stage in stages}
    progress = ReproProgress()
    outcome: dict[str, str] = {}
    failure: list[str] = []
    started: list[str] = []
    seconds: dict[str, float] = {}

    def follow_all() -> None:
        for stage in stages:
            started.append(stage)
            start = time.perf_counter()
            state = run_task_sync(follow_stage, task_run=task_runs[stage],
                                  parameters={"stage": stage, "progress": progress}, return_type="state")
            seconds[stage] = time.perf_counter() - start
            if not state.is_completed():
                failure.append(f"stage {stage}: {state.message}")
                return
            outcome[stage] = state.result()

    follower = threading.Thread(target=contextvars.copy_context().run, args=(follow_all,), daemon=True)
    follower.start()
    command = ["repro", "--single-item", *stages] + (["--force"] if force else [])
    try:
        # Each stage dvc starts is forked from a process that has imported what stages import (flows.stage_server).
        with stage_server(root, _dvc_environment({s: r.id for s, r in task_runs.items()})) as env:
            run_dvc(command, root, on_line=progress.read_line, env=env)
        progress.exited(0)
    except DvcFailed as exc:
        progress.exited(exc.code, exc.reason)
    except BaseException:
        progress.interrupted()
        follower.join(timeout=10)
        with contextlib.suppress(Exception):  # the interrupt, not a report that failed on the way out, is the news
            _cancel(task_runs, started, "the pipeline was interrupted")
        raise
    follower.join()
    if failure:
        _cancel(task_runs, started, failure[0])
        return Failed(message=failure[0])
    return {stage: StageOutcome(what, seconds.get(stage), *progress.resources.get(stage, (None, None, None)))
            for stage, what in outcome.items()}


@dataclass(frozen=True)
class StageOutcome:
    """What happened to a stage in the pipeline's ``dvc repro``, with its wall time there (DVC's own work on the
    stage included) and, for a stage that ran, the time and peak memory its process reported; ``forked_at_mib``: its
    resident memory when the stage server forked it (pages shared with the server, counted in its peak), None for a
    stage that ran in a new process."""

    outcome: str
    seconds: float | None = None
    stage_seconds: float | None = None
    peak_memory_mib: int | None = None
    forked_at_mib: int | None = None

    def to_dict(self) -> dict:
        return {"outcome": self.outcome, "wall_seconds": None if self.seconds is None else round(self.seconds, 3),
                "stage_seconds": self.stage_seconds, "peak_memory_mib": self.peak_memory_mib,
                "forked_at_mib": self.forked_at_mib}

    def row(self, stage: str) -> str:
        ran = self.outcome == "ran"
        wall = "-" if self.seconds is None else _duration(self.seconds)
        own = _duration(self.stage_seconds) if ran and self.stage_seconds is not None else "-"
        memory = f"{self.peak_memory_mib} MiB" if ran and self.peak_memory_mib is not None else "-"
        if memory != "-" and self.forked_at_mib is not None:
            memory += f" (forked at {self.forked_at_mib})"
        return f"| {stage} | {self.outcome} | {wall} | {own} | {memory} |"


def _duration(seconds: float) -> str:
    """Seconds for the table: tenths from one second up, hundredths below (a tiny stage is not "0.0 s")."""
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"


def outcome_table(outcome: dict[str, StageOutcome]) -> str:
    """The pipeline's summary as a markdown table: per stage, what happened, the wall time in ``dvc repro``, and for a
    stage that ran its own time and peak memory."""
    header = "| stage | outcome | wall time | stage time | peak memory |\n|---|---|---|---|---|"
    return "\n".join([header, *(result.row(stage) for stage, result in outcome.items())])


def code_version(root: str | Path) -> str | None:
    """``git describe --always --dirty`` of the workspace (``abc1234-dirty`` with uncommitted changes), or None
    outside git."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                                   text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else None


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


@dataclass(frozen=True)
class RunRecord:
    """What ``reports/pipeline_run.json`` holds: when and on what code the run started, the stages asked for (and
    whether that was every stage of ``dvc.yaml``), the CPUs and the 1/5/15-minute load average before and after the
    ``dvc repro``, its wall seconds, and each stage's :class:`StageOutcome`."""

    date: str
    commit: str | None
    stages_selected: list[str]
    all_stages: bool
    force: bool
    cpus: int | None
    load_average_start: list[float]
    load_average_end: list[float]
    repro_seconds: float
    stages: dict[str, StageOutcome]

    def to_dict(self) -> dict:
        fields = asdict(self)
        fields["stages"] = {stage: outcome.to_dict() for stage, outcome in self.stages.items()}
        return fields

    def write(self, root: str | Path) -> Path:
        from gmpipe.artifacts import write_json

        path = Path(root) / RUN_RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict())
        return path


def _cancel(task_runs: dict, started: list[str], why: str) -> None:
    """Mark the stage task runs that never started Cancelled: they did not run, because of ``why``."""
    with get_client(sync_client=True) as client:
        for stage, task_run in task_runs.items():
            if stage not in started:
                client.set_task_run_state(task_run.id, Cancelled(message=f"not run: {why}"), force=True)


@flow(name="pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str = ".", force: bool = False) -> dict[str, str] | State:
    """Run ``stages`` (default: all, in DVC order) under the workspace lock, between a ``dvc pull`` and a
    ``dvc push`` when a remote is configured; returns what happened to each stage and writes it with its times and
    peak memory to ``ROOT/reports/pipeline_run.json`` (:class:`RunRecord`). The first stage that fails fails the run
    with its reason, and nothing is pushed or written."""
    order = dvc_stage_order(root)
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    selected = [s for s in order if stages is None or s in stages]
    with workspace_lock(root):
        remote = dvc_remote(root)
        if remote:
            pull_outputs(remote, root)
        else:
            print(f"no DVC remote configured ({REMOTE_ENV} or `dvc remote add -d`): nothing pulled or pushed")
        # The code the run starts on: described before dvc repro rewrites dvc.lock and the reports (which would
        # make every finished run read "-dirty").
        date, commit = datetime.now(timezone.utc).isoformat(timespec="seconds"), code_version(root)
        load_before, start = _load_average(), time.perf_counter()
        outcome = repro_stages(selected, root, force)
        if isinstance(outcome, State):
            return outcome
        record = RunRecord(date, commit, selected, selected == order, force, os.cpu_count(), load_before,
                           _load_average(), round(time.perf_counter() - start, 3), outcome)
        if remote:
            push_outputs(remote, root)
    table = outcome_table(outcome)
    print(table)
    print(f"wrote {record.write(root)}")
    create_markdown_artifact(key="pipeline", markdown=table)
    return {stage: result.outcome for stage, result in outcome.items()}
