"""The pipeline's side of the stage server (:mod:`flows.stage_server`): starting it for one ``dvc repro``
(:func:`stage_server`), and what ``gmpipe stage`` does when that ``dvc repro`` names it (:func:`run_in_server`).
Standard library only: a stage that runs in a new process after all pays nothing for asking, and the server runs as
a program of its own (never imported here).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SOCKET_ENV = "GMPIPE_STAGE_SERVER"
# Set by the shell and dvc per stage (dvc: the stage's name and the repo's root); read at run time, never at import.
PER_STAGE_VARIABLES = frozenset({SOCKET_ENV, "DVC_ROOT", "DVC_STAGE", "SHLVL", "_", "PWD", "OLDPWD", "PS1"})
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READY_TIMEOUT = 60.0  # seconds a client waits for the server's first answer (it listens once it has imported)
MAX_MESSAGE = 1 << 20
SERVER_PROGRAM = "import sys; del sys.path[0]; from flows.stage_server import main; sys.exit(main())"
# What the server may take to stop a stage it still runs (flows.processes.STOP_SIGNALS: 10 + 5 + 5 s) and exit.
SERVER_STOP_SECONDS = 30.0


def send_message(connection: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(connection, [data], fds)
    else:
        connection.sendall(data)


class MessageReader:
    """Newline-delimited JSON messages from a stream socket (the first may carry file descriptors)."""

    def __init__(self, connection: socket.socket):
        self.connection, self.pending = connection, b""

    def read(self, with_fds: int = 0) -> tuple[dict | None, list[int]]:
        fds: list[int] = []
        while b"\n" not in self.pending:
            if with_fds and not fds:
                data, fds, _, _ = socket.recv_fds(self.connection, MAX_MESSAGE, with_fds)
            else:
                data = self.connection.recv(MAX_MESSAGE)
            if not data:
                return None, fds
            self.pending += data
            if len(self.pending) > MAX_MESSAGE:
                raise ValueError("message too long")
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line), fds


def run_in_server(argv: list[str]) -> int | None:
    """Run ``argv`` (this ``gmpipe stage`` command) in the pipeline's stage server and return its exit code, or None
    when no server is named, none answers, or it declines (the caller then runs the stage itself). A decline is
    said on stderr with its reason."""
    path = os.environ.get(SOCKET_ENV)
    if not path or path == "off":
        return None
    if not os.path.exists(path):
        print("gmpipe: the pipeline's stage server is still importing; running the stage in a new process",
              file=sys.stderr, flush=True)
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(READY_TIMEOUT)
        connection.connect(path)
        send_message(connection, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
        reader = MessageReader(connection)
        answer, _ = reader.read()
    except (OSError, ValueError) as exc:
        connection.close()
        print(f"gmpipe: stage server at {path} not reachable ({exc}); running the stage in a new process",
              file=sys.stderr, flush=True)
        return None
    if answer is None or "pid" not in answer:
        connection.close()
        reason = (answer or {}).get("declined", "it closed the connection")
        print(f"gmpipe: stage server declined ({reason}); running the stage in a new process", file=sys.stderr,
              flush=True)
        return None
    connection.settimeout(None)
    print(f"gmpipe: stage forked by the pipeline's stage server (process {answer['pid']})", file=sys.stderr,
          flush=True)
    return _wait_for_child(connection, reader, int(answer["pid"]))


def _wait_for_child(connection: socket.socket, reader: MessageReader, pid: int) -> int:
    """The child's exit code, forwarding the stop signals this process gets to it meanwhile."""

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        with connection:
            try:
                message, _ = reader.read()
            except (OSError, ValueError):
                message = None
        if message is None or "exit" not in message:
            # The server went away: the kernel sends the child SIGTERM (its parent-death signal); wait for it to end.
            while running(pid):
                time.sleep(0.1)
            print("gmpipe: error: the stage server stopped while the stage ran", file=sys.stderr, flush=True)
            return 1
        return int(message["exit"])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def running(pid: int) -> bool:
    """Whether ``pid`` runs: not gone, and not a zombie waiting to be reaped (an orphan waits for init, which in a
    container may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def wait_until_ready(env: dict[str, str], timeout: float) -> bool:
    """Whether the stage server ``env`` names (:func:`stage_server`) listens within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(env[SOCKET_ENV]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def stage_server(root: str | Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A stage server for one ``dvc repro`` in ``root``, started with ``env`` (the environment dvc gets): yields
    ``env`` with the server's socket named; stops the server (and whatever stage it still runs) on the way out.
    ``GMPIPE_STAGE_SERVER=off`` in the environment: no server, ``env`` as it is."""
    import subprocess

    from flows.processes import OWN_PROCESS_GROUP

    if env.get(SOCKET_ENV) == "off":
        yield {key: value for key, value in env.items() if key != SOCKET_ENV}
        return
    with tempfile.TemporaryDirectory(prefix="gmpipe-stage-") as folder:
        path = str(Path(folder) / "socket")
        server_env = {key: value for key, value in env.items() if key != SOCKET_ENV}
        log = Path(folder) / "server.log"
        # Not `python -m`, which puts the working folder first on sys.path: the server imports gmpipe from where the
        # `gmpipe` command does (a project folder may hold another copy). Its output goes to a file, not a terminal
        # (Prefect's console handler, made in the server, would colour what the stages print).
        with open(log, "wb") as log_file:
            process = subprocess.Popen([sys.executable, "-c", SERVER_PROGRAM, path], cwd=root, env=server_env,
                                       stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                                       **OWN_PROCESS_GROUP)
        try:
            yield {**server_env, SOCKET_ENV: path}
        finally:
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(timeout=SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.returncode:  # it failed (its stages ran in new processes): say why
                said = log.read_text(errors="replace").strip().splitlines()[-5:]
                print(f"gmpipe: the stage server exited with code {process.returncode}: {' | '.join(said)}",
                      file=sys.stderr, flush=True)
