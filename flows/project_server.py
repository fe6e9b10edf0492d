"""The project's shared local Prefect server, for ``gmpipe stage`` runs when no Prefect API is configured.

Without it each stage would wait for a temporary server of its own (8-18 s on two cores). Instead the first stage
starts this one, later stages (the next stage of a ``dvc repro``, a stage rerun by hand) find it running and use it
at once, and it stops itself once no gmpipe process has used it for ``GMPIPE_SERVER_IDLE_MINUTES`` minutes (default
10); ``gmpipe server stop`` stops it now. It is left running on purpose between stages, so an interrupted stage
(exit 130/143) does not stop it either; it never outlives its keeper.

It lives in the project's private Prefect home (``.prefect/``, whose database the pipeline's own server uses too):
a keeper process (``python -m flows.project_server``) and its child ``prefect server start --host 127.0.0.1``, which
dies with the keeper (``PR_SET_PDEATHSIG``), so even a keeper killed with SIGKILL leaves no server behind. Files:

- ``server.json``: the keeper's pid and start time, the API URL, and whether the server answers yet;
- ``server.lease``: every gmpipe process that uses the server holds a shared ``flock`` on it while it runs (the
  kernel drops it when the process dies, however it dies). The keeper stops the server only after it could take
  the lock exclusively for the whole idle time, and holds it while it stops, so no process starts using a server
  that is going away;
- ``server.start.lock``: held while a process looks for a server and starts one, so two stages starting at once
  start one server;
- ``server.log``: the server's output.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.server import die_with_parent, free_port, stop, wait_healthy

IDLE_MINUTES_ENV = "GMPIPE_SERVER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 10.0
RECORD, LEASE, START_LOCK, LOG = "server.json", "server.lease", "server.start.lock", "server.log"
STARTUP_TIMEOUT = 120.0
POLL_SECONDS = 1.0


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of ``/proc/PID/stat``), or None if there is no such process: with
    the pid it names one process, never a later one that reused the pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_record(home: Path) -> dict | None:
    """The record of a keeper that is still alive, else None."""
    try:
        record = json.loads((home / RECORD).read_text())
        alive = _start_time(int(record["pid"])) == record["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if alive else None


def _write_record(home: Path, record: dict) -> None:
    temporary = home / f".{RECORD}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record) + "\n")
    os.replace(temporary, home / RECORD)


def _answers(api_url: str) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    return False


class ProjectServer:
    """This process's use of the project server in ``home``: :meth:`start` finds it or starts it without waiting,
    :meth:`api_url` waits until it answers. The lease is held from :meth:`start` until this process exits."""

    def __init__(self, home: str | Path):
        self.home = Path(home)
        self.started_here = False
        self._record: dict | None = None
        self._lease = None

    def start(self) -> ProjectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        # Shared: blocks only while the keeper is stopping the server (it holds the lock exclusively then).
        self._lease = open(self.home / LEASE, "a+")
        fcntl.flock(self._lease, fcntl.LOCK_SH)
        with open(self.home / START_LOCK, "a+") as start_lock:
            fcntl.flock(start_lock, fcntl.LOCK_EX)
            self._record = _read_record(self.home)
            if self._record is None:
                self._record = self._start_keeper()
                self.started_here = True
        return self

    @classmethod
    def running(cls, home: str | Path) -> ProjectServer | None:
        """The project server in ``home`` with a lease taken, if it runs and answers; else None."""
        server = cls(home)
        if not server.home.is_dir():
            return None
        server._lease = open(server.home / LEASE, "a+")
        fcntl.flock(server._lease, fcntl.LOCK_SH)
        server._record = _read_record(server.home)
        if server._record is None or not server._record["ready"] or not _answers(server._record["api_url"]):
            server._lease.close()
            return None
        return server

    def _start_keeper(self) -> dict:
        port = free_port()
        keeper = subprocess.Popen(
            [sys.executable, "-m", "flows.project_server", str(self.home), str(port), str(idle_seconds())],
            cwd=self.home, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=dict(os.environ, PYTHONPATH=_code_root()))
        record = {"pid": keeper.pid, "started": _start_time(keeper.pid), "api_url": f"http://127.0.0.1:{port}/api",
                  "ready": False}
        _write_record(self.home, record)
        return record

    def api_url(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """The server's API URL once it answers; raises RuntimeError if its keeper exits or it does not answer in
        ``timeout`` seconds (its log says why)."""
        deadline = time.monotonic() + timeout
        while True:
            record = _read_record(self.home)
            if record is None or record["pid"] != self._record["pid"]:
                raise RuntimeError(f"the project's Prefect server stopped while starting; see {self.home / LOG}")
            if record["ready"] and _answers(record["api_url"]):
                return record["api_url"]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the project's Prefect server did not answer within {timeout:.0f} s; "
                                   f"see {self.home / LOG}")
            time.sleep(0.2)


def idle_seconds() -> float:
    text = os.environ.get(IDLE_MINUTES_ENV, "").strip()
    try:
        minutes = float(text) if text else DEFAULT_IDLE_MINUTES
    except ValueError:
        minutes = DEFAULT_IDLE_MINUTES
    return max(minutes, 0.0) * 60.0


def _code_root() -> str:
    """The folder holding ``flows/``, first on the keeper's import path: a scratch project's own copy of the code is
    the one that runs, as for the stages."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([root, os.environ["PYTHONPATH"]]) if os.environ.get("PYTHONPATH") else root


def status(home: str | Path) -> dict | None:
    """The record of the project server in ``home`` if its keeper is alive."""
    return _read_record(Path(home))


def stop_server(home: str | Path, timeout: float = 30.0) -> bool:
    """Stop the project server in ``home`` (SIGTERM to its keeper, which stops the server); False if none ran."""
    record = _read_record(Path(home))
    if record is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(record["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _start_time(record["pid"]) == record["started"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def keep(home: Path, port: int, idle: float) -> int:
    """The keeper: run the server, mark it ready once it answers, and stop it after ``idle`` seconds without a
    lease holder, on SIGTERM/SIGINT/SIGHUP, or when it exits on its own; remove the record on the way out."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    api_url = f"http://127.0.0.1:{port}/api"
    record = {"pid": os.getpid(), "started": _start_time(os.getpid()), "api_url": api_url, "ready": False}
    server = None
    with open(home / LOG, "ab") as log, open(home / LEASE, "a+") as lease:
        try:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)
            wait_healthy(api_url, timeout=STARTUP_TIMEOUT, process=server)
            _write_record(home, record | {"ready": True})
            last_used = time.monotonic()
            while server.poll() is None:
                time.sleep(POLL_SECONDS)
                try:
                    fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    last_used = time.monotonic()
                    continue
                if time.monotonic() - last_used >= idle:
                    break  # still holding the lease exclusively: nobody starts using the server while it stops
                fcntl.flock(lease, fcntl.LOCK_UN)
        except (_Stop, RuntimeError, TimeoutError):
            pass
        finally:
            if _read_record(home) is not None and _read_record(home)["pid"] == os.getpid():
                (home / RECORD).unlink(missing_ok=True)
            if server is not None:
                stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
