"""Reading what a run left on the test Prefect server (flow runs, their children, logs, artifacts), and the
environments the orchestration tests run ``gmpipe`` in. Import Prefect only inside tests that take ``prefect_api``.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from tests.conftest import BIN

SETTINGS_FROM_THE_SESSION = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH")


def unconfigured_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user who configured no Prefect API: the session's Prefect settings removed and a scratch
    ``HOME`` (so no ``~/.prefect/profiles.toml`` either); Prefect's own log shipping on."""
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS_FROM_THE_SESSION}
    home.mkdir(parents=True, exist_ok=True)
    return env | {"HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
                  "PREFECT_LOGGING_TO_API_ENABLED": "true", "OMP_NUM_THREADS": "1"} | extra


def flow_run_id_in(output: str, flow_name: str) -> str:
    """The id of the ``flow_name`` run that a command's console output announced (Prefect prints its UI link)."""
    pattern = rf"Beginning flow run '[^']+' for flow '{flow_name}'.*?/runs/flow-run/([0-9a-f-]{{36}})"
    return re.search(pattern, output, re.S).group(1)


def child_flow_runs(parent_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def flow_name(flow_run) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow(flow_run.flow_id).name


def task_run_name(task_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id).name


def log_lines(flow_run_id) -> list[str]:
    """Every log message of a flow run (its task runs' included), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=len(messages), sort=LogSort.TIMESTAMP_ASC)
            messages += [log.message for log in page]
            if len(page) < 200:
                return messages


def artifacts_of(flow_run_id, kind: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=[kind])))


def processes_inside(folder: Path) -> list[str]:
    """Live processes whose working directory is ``folder`` or below it (server, worker, dvc, stages, ranks)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if command and state != "Z" and (cwd == str(folder) or cwd.startswith(f"{folder}/")):
            found.append(f"{proc.name}: {command}")
    return found


def kill_session(session: int) -> None:
    """SIGKILL every process of a session (what a preempted machine or a killed container does to a run: its
    children, each in a process group of its own, included)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == session:  # state ppid pgrp session
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def task_runs_of(flow_run_id) -> dict:
    """The task runs of a flow run, by name, as the API has them once each is in a final state (task run states
    reach the server as events, a moment after the run set them)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
                return {run.name: run for run in runs}
            time.sleep(0.5)
