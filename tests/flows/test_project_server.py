"""`gmpipe stage` with no Prefect API configured: the project's shared server, started by the first stage, reused by
the next (through `dvc repro` too) and by `gmpipe pipeline`, kept while a process holds its lease, and gone once
idle; a server never outlives its keeper."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, smoke_params

IDLE_MINUTES = 0.1  # 6 s


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_stages_share_one_project_server_that_stops_once_idle(dvc_project, tmp_path):
    from tests.flows.runs import processes_inside, unconfigured_env

    root = dvc_project(smoke_params(prepare={"max_per_class": 2}))
    env = unconfigured_env(tmp_path / "home", GMPIPE_SERVER_IDLE_MINUTES=str(IDLE_MINUTES))
    home = root / ".prefect"

    first = subprocess.run(["gmpipe", "stage", "prepare"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting the project's Prefect server" in first.stdout
    record = json.loads((home / "server.json").read_text())
    api_url = record["api_url"]
    assert record["ready"] and api_url.startswith("http://127.0.0.1:")

    with open(home / "server.lease") as lease:  # a process using the server keeps it, however long it is idle
        fcntl.flock(lease, fcntl.LOCK_SH)
        time.sleep(IDLE_MINUTES * 60 + 3)
        second = subprocess.run(["dvc", "repro", "--force", "prepare"], cwd=root, env=env, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        output = second.stdout + second.stderr
        assert "starting the project's Prefect server" not in output
        assert f"View at {api_url.removesuffix('/api')}/runs/flow-run/" in output
        runs = _flow_runs(api_url)
        assert len(runs) == 2 and {run["state_type"] for run in runs} == {"COMPLETED"}

        pipeline = subprocess.run(["gmpipe", "pipeline", "prepare"], cwd=root, env=env, capture_output=True,
                                  text=True, timeout=300)  # uses the running server rather than starting its own
        assert pipeline.returncode == 0, pipeline.stdout[-3000:] + pipeline.stderr[-3000:]
        assert f"using the project's Prefect server at {api_url}" in pipeline.stdout
        assert "starting a local server" not in pipeline.stdout
        assert "| prepare | up to date |" in pipeline.stdout
        assert len(_flow_runs(api_url)) == 3
        status = subprocess.run(["gmpipe", "server", "status"], cwd=root, env=env, capture_output=True, text=True)
        assert status.stdout.strip() == f"the project's Prefect server runs at {api_url} (keeper pid {record['pid']})"

    deadline = time.monotonic() + IDLE_MINUTES * 60 + 30
    while processes_inside(root) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_inside(root) == []  # keeper and server
    assert not (home / "server.json").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{api_url}/health", timeout=2)
    status = subprocess.run(["gmpipe", "server", "status"], cwd=root, env=env, capture_output=True, text=True)
    assert status.stdout.startswith("no project Prefect server runs in ")


def test_a_server_dies_with_its_keeper(tmp_path):
    """SIGKILL to a keeper, or to a pipeline that started its own server (nothing of it runs on the way out): the
    process it started as the server (in a session of its own) gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and
    exits, instead of running on as an orphan."""
    pid_file = tmp_path / "child"
    keeper = textwrap.dedent(f"""
        import subprocess, sys, time
        from flows.server import die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                                 preexec_fn=die_with_parent)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", keeper], env=env)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def _gone(pid: int) -> bool:
    """Exited (a zombie only waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True
