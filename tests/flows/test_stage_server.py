"""The pipeline's stage server (``flows.stage_server``): a stage that dvc starts is forked from a process that has
imported what stages import, and runs as a new process would (same outputs, exit codes, stop signals), or runs in a
new process when the server cannot promise that. Real processes: the server, dvc, ``gmpipe stage``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import stage_client, stage_server
from flows.stage_client import SOCKET_ENV
from flows.stage_server import CodeSnapshot, StageServer
from tests.conftest import BIN, run, smoke_params

FORKED = "stage forked by the pipeline's stage server"


@contextlib.contextmanager
def ready_server(root: Path, env: dict[str, str] | None = None):
    """A stage server for ``root`` (as the pipeline starts it, with ``env``: by default this process's), once it is
    ready; yields the environment dvc gets."""
    env = env or dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    env.pop(SOCKET_ENV, None)
    with stage_client.stage_server(root, env) as served:
        assert stage_client.wait_until_ready(served, 120), "the stage server did not get ready"
        yield served


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_served_stage_writes_what_a_new_process_writes(prefect_api, dvc_project):
    root = dvc_project(smoke_params(prepare={"max_per_class": 3}))
    run(["gmpipe", "stage", "prepare"], root)
    cold = run(["dvc", "repro", "--force", "--single-item", "train_vae"], root)  # by hand: no server
    assert FORKED not in cold.stdout + cold.stderr
    expected = _tree_digest(root / "models" / "vae")
    # Its metrics to the last bit too (the BLAS threads behind the Frechet distance are checked on their own below:
    # at these sizes numpy's and scipy's linear algebra runs single-threaded either way).
    metrics = (root / "reports" / "train_vae" / "metrics.json").read_text()

    # Started from a process that never imported gmpipe (no OpenMP defaults of gmpipe's in its environment), as the
    # stages' `gmpipe stage` has them: still served.
    launcher_env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    launcher_env.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    with ready_server(root, launcher_env) as env:
        served = subprocess.run(["dvc", "repro", "--force", "--single-item", "train_vae"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=600)
        assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
        assert FORKED in served.stdout + served.stderr
        assert _tree_digest(root / "models" / "vae") == expected  # bit for bit: same code, seeds, threads
        assert (root / "reports" / "train_vae" / "metrics.json").read_text() == metrics
        assert re.search(r"gmpipe: stage train_vae took [\d.]+ s, peak memory \d+ MiB \(forked by the stage server "
                         r"at \d+ MiB\)", served.stdout + served.stderr)

        # A stage that fails in the server fails the same way: one error line and its exit code.
        (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("steps:", "steps: -1 #", 1))
        failed = subprocess.run(["gmpipe", "stage", "train_vae"], cwd=root, env=env, capture_output=True, text=True,
                                timeout=300)
        assert FORKED in failed.stderr and failed.returncode == 2
        assert "Traceback" not in failed.stderr and "steps" in failed.stderr
    assert run(["dvc", "status", "train_vae"], root, check=False).returncode == 0


@pytest.mark.slow
def test_a_served_stage_exits_as_a_process_does_its_last_log_lines_sent(prefect_api, dvc_project, tmp_path):
    """The forked stage ends the way an interpreter ends (Prefect's log worker drained at exit), so its flow run's
    logs on the server are complete, down to the line the stage prints last."""
    from tests.flows.runs import flow_run_id_in, log_lines, unconfigured_env

    root = dvc_project(smoke_params(prepare={"max_per_class": 2}, compute={"threads": 1},
                                    train_vae={"steps": 4, "log_every": 2, "checkpoint_every": 4, "warmup_steps": 0,
                                               "eval_images": 16}))
    home = tmp_path / "home"
    (home / ".prefect").mkdir(parents=True)
    (home / ".prefect" / "profiles.toml").write_text(
        f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{prefect_api}"\n')
    env = unconfigured_env(home)  # Prefect ships the logs to the profile's server
    run(["gmpipe", "stage", "prepare"], root)
    with ready_server(root, env) as served:
        result = subprocess.run(["dvc", "repro", "--force", "--single-item", "train_vae"], cwd=root, env=served,
                                capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and FORKED in output, output[-3000:]
    lines = log_lines(flow_run_id_in(output, "train_vae"))
    assert any(line.startswith("train_vae: step 4/4") for line in lines), lines
    assert any(line.startswith("gmpipe: stage train_vae took") for line in lines), lines[-5:]


@pytest.mark.parametrize("stop", ["ctrl-c", "kill", "server killed"])
def test_stopping_the_command_stops_the_stage_it_was_served(stop, prefect_api, dvc_project, tmp_path):
    """Ctrl-C (SIGINT) to a served ``gmpipe stage`` reaches its stage (exit 130, as a new process); a ``gmpipe stage``
    killed outright gets its stage stopped by the server; closing the server leaves no process."""
    long_training = {"steps": 100_000, "checkpoint_every": 100_000, "log_every": 1, "warmup_steps": 0}
    root = dvc_project(smoke_params(prepare={"max_per_class": 2}, compute={"threads": 1}, train_vae=long_training))
    run(["gmpipe", "stage", "prepare"], root)
    output = tmp_path / "stage.log"
    with ready_server(root) as env:
        with open(output, "wb") as log:
            client = subprocess.Popen(["gmpipe", "stage", "train_vae"], cwd=root, env=env, stdout=log,
                                      stderr=subprocess.STDOUT,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while "train_vae: step 1/100000" not in output.read_text() and client.poll() is None:
                assert time.monotonic() < deadline, output.read_text()[-3000:]
                time.sleep(0.2)
            child = int(re.search(rf"{FORKED} \(process (\d+)\)", output.read_text()).group(1))
            if stop == "server killed":  # the stage gets SIGTERM from the kernel, its command says what happened
                os.kill(next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_server(int(p), env)),
                        signal.SIGKILL)
            else:
                client.send_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGKILL)
            code = client.wait(timeout=60)
            deadline = time.monotonic() + 30
            while stage_client.running(child):
                assert time.monotonic() < deadline, "the served stage outlived its command"
                time.sleep(0.2)
        finally:
            if client.poll() is None:
                client.kill()
        text = output.read_text()
        if stop == "ctrl-c":
            assert code == 130, text[-3000:]
            assert "Traceback" not in text and "interrupted" in text
        elif stop == "kill":
            assert code == -signal.SIGKILL
        else:
            assert code == 1 and "the stage server stopped while the stage ran" in text, text[-3000:]
        servers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_server(int(p), env)]
    deadline = time.monotonic() + 40
    while any(stage_client.running(pid) for pid in servers):
        assert time.monotonic() < deadline, "the stage server outlived the pipeline"
        time.sleep(0.2)


FORKED_THREADS = """
import json, os, sys
fresh_env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
os.environ["OMP_NUM_THREADS"] = "1"  # as the server imports
import gmpipe, numpy, scipy.linalg, torch
from threadpoolctl import threadpool_info
from flows.stage_server import fresh_threads, set_fresh_threads

def state():
    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal(2_000_000), rng.standard_normal(2_000_000)
    a = rng.standard_normal((400, 400))
    return {"torch": torch.get_num_threads(), "pools": {i["filepath"]: i["num_threads"] for i in threadpool_info()},
            "dot": float(x @ y).hex(), "sqrtm": float(scipy.linalg.sqrtm(a @ a.T).real.sum()).hex()}

threads = json.loads(fresh_threads(fresh_env).communicate()[0])
pid = os.fork()
if pid == 0:
    os.environ.clear()
    os.environ.update(fresh_env)
    set_fresh_threads(threads)
    print(json.dumps(state()), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""
FRESH_STATE = FORKED_THREADS.split("threads = json.loads")[0].replace('os.environ["OMP_NUM_THREADS"] = "1"', "pass") \
    + "print(json.dumps(state()))"


def test_a_forked_stage_has_the_threads_of_a_new_process_and_computes_the_same_bits():
    """The server imports with one OpenMP / BLAS thread (libgomp's workers do not survive a fork); a child sets
    torch's and every BLAS pool's threads as a new process has them, so numpy / scipy linear algebra (the Frechet
    distance) gives the same bits as in a new process."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    forked = subprocess.run([sys.executable, "-c", FORKED_THREADS], env=env, capture_output=True, text=True,
                            timeout=300)
    fresh = subprocess.run([sys.executable, "-c", FRESH_STATE], env=env, capture_output=True, text=True, timeout=300)
    assert forked.returncode == 0 and fresh.returncode == 0, forked.stderr[-2000:] + fresh.stderr[-2000:]
    assert json.loads(forked.stdout) == json.loads(fresh.stdout)


def _is_server(pid: int, env: dict[str, str]) -> bool:
    with contextlib.suppress(OSError):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return env[SOCKET_ENV].encode() in command
    return False


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A StageServer in this process for its checks (nothing is forked), as if it ran single-threaded."""
    monkeypatch.setattr(stage_server, "_threads", lambda: 1)
    environment = {"PATH": "/usr/bin", "OMP_WAIT_POLICY": "ACTIVE"}
    return StageServer(socket.socket(socket.AF_UNIX), tmp_path.resolve(), environment, CodeSnapshot([tmp_path]), 2)


def _request(server, **changes) -> dict:
    return {"argv": ["gmpipe", "stage", "train_vae"], "cwd": str(server.root),
            "env": dict(server.environment, DVC_STAGE="train_vae", DVC_ROOT=str(server.root))} | changes


def test_the_server_serves_only_what_would_run_the_same(server):
    assert server.decline_reason(_request(server), os.getuid()) is None  # dvc's own per-stage variables are fine
    assert "user" in server.decline_reason(_request(server), os.getuid() + 1)
    assert "only 'gmpipe stage NAME'" in server.decline_reason(_request(server, argv=["gmpipe", "sample"]),
                                                               os.getuid())
    assert "not /" in server.decline_reason(_request(server, cwd="/"), os.getuid())
    changed = _request(server)
    changed["env"] = dict(changed["env"], OMP_NUM_THREADS="1")  # read when torch loads: a new process must run it
    assert "OMP_NUM_THREADS" in server.decline_reason(changed, os.getuid())
    removed = _request(server)
    del removed["env"]["OMP_WAIT_POLICY"]
    assert "OMP_WAIT_POLICY" in server.decline_reason(removed, os.getuid())


def test_without_a_prefect_api_in_its_environment_the_server_serves_nothing(server):
    server.refusal = "no Prefect API is configured in the pipeline's environment"
    assert server.decline_reason(_request(server), os.getuid()) == server.refusal


def test_an_edited_module_is_named_and_declined(tmp_path, monkeypatch, server):
    package = tmp_path / "snapshot_package_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "part.py").write_text("PART = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("snapshot_package_for_test.part")
    try:
        server.code = CodeSnapshot([package])
        assert set(server.code.hashes) == {(package / "__init__.py").resolve(), (package / "part.py").resolve()}
        (package / "later.py").write_text("LATER = 1\n")  # a new file (the changed code may import it)
        assert server.code.changed() == (package / "later.py").resolve()
        (package / "later.py").unlink()
        assert server.code.changed() is None
        assert server.decline_reason(_request(server), os.getuid()) is None
        (package / "part.py").write_text("PART = 2\n")
        assert server.code.changed() == (package / "part.py").resolve()
        assert "part.py changed" in server.decline_reason(_request(server), os.getuid())
        (package / "part.py").unlink()
        assert server.code.changed() == (package / "part.py").resolve()
    finally:
        for name in [name for name in sys.modules if name.startswith("snapshot_package_for_test")]:
            del sys.modules[name]


def test_a_stage_runs_in_a_new_process_when_no_server_answers(prefect_api, dvc_project, tmp_path):
    root = dvc_project(smoke_params(prepare={"max_per_class": 2}))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    for path, said in ((tmp_path / "missing.sock", "still importing"), (tmp_path / "dead.sock", "not reachable")):
        if "dead" in path.name:  # a socket file nobody listens on (a server that died)
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(str(path))
        result = subprocess.run(["gmpipe", "stage", "prepare"], cwd=root, env=dict(env, **{SOCKET_ENV: str(path)}),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert said in result.stderr and FORKED not in result.stderr
        assert (root / "data" / "prepared" / "manifest.json").is_file()


def test_the_pipeline_can_be_told_not_to_start_one(tmp_path):
    with stage_client.stage_server(tmp_path, {"PATH": "/usr/bin", SOCKET_ENV: "off"}) as env:
        assert SOCKET_ENV not in env
    assert not list(tmp_path.iterdir())
