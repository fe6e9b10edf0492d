"""A local Prefect server for the length of one run: started on loopback, stopped (by PID) afterwards, also when the
run is interrupted, and only after this process has sent it what it still had queued (log lines, events)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_healthy(api_url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Prefect server exited with code {process.returncode} before it was healthy")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {api_url} not healthy after {timeout:.0f} s")


# Looked up here, not in the forked child, where loading a library could wait on a lock another thread held.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``preexec_fn``, between fork and exec: the server gets SIGTERM when the process that started it dies
    (``PR_SET_PDEATHSIG``), so a run killed with SIGKILL, which cannot stop it, leaves no server behind. The kernel
    watches the thread that started it: start servers from one that outlives them (the main thread)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Prefect's server and workers need two SIGTERMs: the first starts a graceful shutdown. An interrupt while it
    waits (a second Ctrl-C) moves on to the next signal rather than leaving the process running."""
    for stop_signal, wait in ((signal.SIGTERM, grace / 2), (signal.SIGTERM, grace / 2), (signal.SIGKILL, None)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            process.wait(wait)


def send_queued_reports(timeout: float = 5.0) -> None:
    """Send the log lines and events this process has queued for the API, waiting at most ``timeout`` seconds for
    each kind: a server stopped before that loses them, and Prefect would retry against it at exit for a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception, KeyboardInterrupt):
            worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def local_server(host: str = "127.0.0.1", port: int | None = None, log_file: Path | None = None) -> Iterator[str]:
    """Start ``prefect server start`` on ``host`` (loopback by default); yield its API URL; stop it after."""
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
    )
    try:
        wait_healthy(api_url, process=process)
        yield api_url
    finally:
        send_queued_reports()
        stop(process)
        if log_file:
            log.close()
