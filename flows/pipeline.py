"""The whole pipeline as one Prefect flow: each stage through ``dvc repro``, so DVC decides what is up to date.

A run holds the workspace lock for its whole length (two runs on one workspace would otherwise race on
``params.yaml``, ``dvc.lock`` and the outputs, and DVC's own repo lock makes the second ``dvc repro`` fail rather
than wait). When a DVC remote is configured, the run pulls from it first and pushes to it after the stages.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.states import Failed, State

from flows.environment import PARENT_TASK_RUN
from flows.overrides import restore_after_killed_run
from flows.processes import run_streaming

WORKSPACE_LOCK = Path(".dvc") / "tmp" / "gmpipe-workspace.lock"
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


def _dvc_environment() -> dict[str, str]:
    """This interpreter's scripts folder first on PATH: a worker started as ``.venv/bin/prefect worker start``
    without an activated venv still finds ``dvc`` and the ``gmpipe`` command that dvc.yaml runs. Inside a task run,
    its id, so that the stage flow ``dvc`` starts becomes a child of this task run."""
    scripts = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=os.pathsep.join([scripts, os.environ.get("PATH", os.defpath)]))
    env.pop(PARENT_TASK_RUN, None)
    task_run = TaskRunContext.get()
    if task_run is not None:
        env[PARENT_TASK_RUN] = str(task_run.task_run.id)
    return env


class DvcFailed(RuntimeError):
    """A dvc command exited non-zero; the message is the one line that says why."""


def run_dvc(arguments: list[str], root: str | Path) -> list[str]:
    """Run ``dvc ARGUMENTS`` in ``root``, its output into the flow log one finished line at a time (a progress
    bar's redraws make one line); raise :class:`DvcFailed` on failure. An interrupt stops dvc and its stage first."""
    command = ["dvc", *arguments]
    code, lines = run_streaming(command, lambda line: print(line, flush=True), cwd=root, env=_dvc_environment())
    if code != 0:
        raise DvcFailed(f"{' '.join(command)} failed (exit {code}): {_failure_reason(lines)}")
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
    result = subprocess.run(["dvc", "remote", "default"], cwd=root, env=_dvc_environment(), capture_output=True,
                            text=True)
    name = result.stdout.strip()
    return name if result.returncode == 0 and name else None


@task(name="dvc-pull", task_run_name="dvc pull -r {remote}")
def pull_outputs(remote: str, root: str = ".") -> None:
    """Fetch the outputs ``dvc.lock`` names from the remote; what the remote lacks (a first run) is not an error."""
    run_dvc(["pull", "--allow-missing", "--remote", remote], root)


@task(name="dvc-push", task_run_name="dvc push -r {remote}")
def push_outputs(remote: str, root: str = ".") -> None:
    """Upload every cached output ``dvc.lock`` names to the remote."""
    run_dvc(["push", "--remote", remote], root)


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def repro_stage(stage: str, root: str = ".", force: bool = False) -> str | State:
    """``dvc repro -s STAGE``: runs the stage only when its deps, params or code changed. A failure is a Failed
    state with the one line that says why (the stage's own run holds the details), not a traceback."""
    try:
        lines = run_dvc(["repro", "--single-item", stage] + (["--force"] if force else []), root)
    except DvcFailed as exc:
        return Failed(message=str(exc))
    skipped = any("didn't change, skipping" in line or "is cached - skipping" in line for line in lines)
    return "up to date" if skipped else "ran"


@flow(name="pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str = ".", force: bool = False) -> dict[str, str] | State:
    """Run ``stages`` (default: all, in DVC order) under the workspace lock, between a ``dvc pull`` and a
    ``dvc push`` when a remote is configured; returns what happened to each stage. The first stage that fails
    fails the run with its reason, and nothing is pushed."""
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
        outcome = {}
        for stage in selected:
            state = repro_stage(stage, root, force, return_state=True)
            if not state.is_completed():
                return Failed(message=f"stage {stage}: {state.message}")
            outcome[stage] = state.result()
        if remote:
            push_outputs(remote, root)
    table = "\n".join(f"| {stage} | {what} |" for stage, what in outcome.items())
    create_markdown_artifact(key="pipeline", markdown=f"| stage | outcome |\n|---|---|\n{table}")
    return outcome
