"""A process that has imported what every stage imports, and forks one child per ``gmpipe stage`` of the pipeline.

A stage run through ``dvc repro`` spends ~4 s importing torch, diffusers, transformers and Prefect before its
function starts, nine times per pipeline. The pipeline (``flows.pipeline.repro_stages``) starts this server for its
one ``dvc repro`` (``flows.stage_client.stage_server``) and names its socket in the environment dvc passes to its
stages. The ``gmpipe stage`` that dvc starts sends its arguments, working folder, environment and standard streams
to the server (``flows.stage_client.run_in_server``), which forks a child that runs exactly that command
(``gmpipe.cli.main``) in that folder with that environment, writing to those streams, and returns its exit code;
the client exits with it. What dvc started is what ran: the same command, the same code, the same output.

The server declines (and the client runs the stage itself, as without a server) whenever the child could differ from
a new process: a gmpipe or flows source file it imported changed since (:class:`CodeSnapshot`), an environment
variable differs from the one it was started with (apart from those set per stage, ``PER_STAGE_VARIABLES``:
libraries read theirs at import), another working folder or command, a thread running in the server (fork copies
only the calling thread), CUDA initialised, or a peer that is not this user. Packages installed into the
environment while the pipeline runs are not detected. The server imports with one OpenMP thread (libgomp's workers
do not survive a fork) and each child sets the threads, the torch and numpy generators as a new process has them.

Stopping: the client forwards SIGINT, SIGTERM and SIGHUP to the child, so Ctrl-C and the pipeline's stop reach it as
they reach a stage dvc started itself; a client that goes away (SIGKILL) gets its child stopped by the server
(SIGTERM); the server stops its child and exits when the pipeline closes its stdin, and a child whose server dies
gets SIGTERM from the kernel. Nothing is served unless the pipeline started the server: ``dvc repro`` and
``gmpipe stage`` run by hand start their stages in new processes, as always.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from flows.stage_client import PER_STAGE_VARIABLES, SOCKET_ENV, MessageReader, send_message


class CodeSnapshot:
    """SHA-256 of every Python source file under the given package folders: :meth:`changed` names the first file
    that differs now (edited, added, deleted), or None. The server takes it before it imports anything of them, so a
    file saved while it imports is caught too."""

    def __init__(self, folders: list[Path]):
        self.folders = [folder.resolve() for folder in folders]
        self.hashes = self._read()

    def _read(self) -> dict[Path, str | None]:
        return {path: self._hash(path) for folder in self.folders for path in sorted(folder.rglob("*.py"))
                if "__pycache__" not in path.parts}

    @staticmethod
    def _hash(path: Path) -> str | None:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None

    def changed(self) -> Path | None:
        now = self._read()
        return next((path for path in sorted(set(now) | set(self.hashes)) if now.get(path) != self.hashes.get(path)),
                    None)


def preimport() -> None:
    """What ``gmpipe stage`` imports for any stage, in its order: the command, the environment, each stage's module,
    then the flow module (whose import sets up Prefect's logging from the settings in force)."""
    import importlib

    import gmpipe.cli  # noqa: F401
    from flows import environment, processes  # noqa: F401
    from gmpipe.stages import STAGES

    for stage in STAGES:
        importlib.import_module(f"gmpipe.stages.{stage}")
    importlib.import_module("flows.stages")


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


class StageServer:
    """Serves one request at a time on a listening Unix socket (module docstring)."""

    def __init__(self, listener: socket.socket, root: Path, environment: dict[str, str], code: CodeSnapshot,
                 threads: dict):
        self.listener, self.root, self.environment, self.code = listener, root, environment, code
        self.threads = threads  # a new process's threads with ``environment``: :func:`fresh_threads`
        self.refusal: str | None = None  # a reason to decline every request

    def decline_reason(self, request: dict, peer_uid: int) -> str | None:
        if self.refusal:
            return self.refusal
        if peer_uid != os.getuid():
            return f"the client runs as user {peer_uid}, the server as {os.getuid()}"
        argv = request.get("argv") or []
        if len(argv) < 3 or argv[1] != "stage":
            return "only 'gmpipe stage NAME' is served"
        if Path(request.get("cwd", "")).resolve() != self.root:
            return f"the server serves {self.root}, not {request.get('cwd')}"
        env = request.get("env") or {}
        differs = sorted(key for key in set(env) | set(self.environment) if key not in PER_STAGE_VARIABLES
                         and env.get(key) != self.environment.get(key))
        if differs:
            return f"the environment differs from the server's in {', '.join(differs[:5])}"
        if (changed := self.code.changed()) is not None:
            return f"{changed} changed since the server imported it"
        if (threads := _threads()) != 1:
            return f"{threads} threads run in the server"
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return "CUDA is initialised in the server"
        return None

    def serve(self, until_closed) -> None:
        """Answer requests until ``until_closed`` (a readable file, the pipeline's pipe) reaches its end."""
        while True:
            ready, _, _ = select.select([self.listener, until_closed], [], [])
            if until_closed in ready and not os.read(until_closed.fileno(), 4096):
                return
            if self.listener in ready:
                connection, _ = self.listener.accept()
                with connection:
                    if self._answer(connection, until_closed) == "stop":
                        return

    def _answer(self, connection: socket.socket, until_closed) -> str | None:
        reader = MessageReader(connection)
        connection.settimeout(10.0)  # a client sends its request at once; a stalled one must not block the server
        try:
            request, fds = reader.read(with_fds=3)
        except (OSError, ValueError):
            return None
        connection.settimeout(None)
        try:
            uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))[1]
            reason = "no request" if request is None else (
                "the client did not send its standard streams" if len(fds) != 3 else self.decline_reason(request, uid))
            if reason:
                with contextlib.suppress(OSError):
                    send_message(connection, {"declined": reason})
                return None
            sys.stdout.flush()
            sys.stderr.flush()
            server = os.getpid()
            pid = os.fork()
            if pid == 0:  # the child: its standard streams are the client's; out of the loop (and its blocks)
                os.setpgid(0, 0)  # a group of its own, stopped as a whole (_wait)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                raise Forked(request, server)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            send_message(connection, {"pid": pid})
        except OSError:
            pass
        status, stop = self._wait(pid, connection, until_closed)
        with contextlib.suppress(OSError):
            send_message(connection, {"exit": status})
        return "stop" if stop else None

    @staticmethod
    def _wait(pid: int, connection: socket.socket, until_closed) -> tuple[int, bool]:
        """The child's exit code (128 + the signal that ended it). If its client goes away or the pipeline closes the
        server's stdin, the child's whole tree is stopped as the pipeline stops a stage's (``flows.processes.
        stop_tree``: SIGINT, SIGTERM, SIGKILL, also to descendants in sessions of their own), and in the latter case
        the server stops serving."""
        from flows.processes import stop_tree

        status: list[int] = []

        def reap() -> bool:
            if not status:
                finished, raw = os.waitpid(pid, os.WNOHANG)
                if finished:
                    status.append(os.waitstatus_to_exitcode(raw))
            return bool(status)

        stop = False
        while not reap():
            ready, _, _ = select.select([connection, until_closed], [], [], 0.2)
            gone = [source for source in ready
                    if not (connection.recv(4096) if source is connection else os.read(source.fileno(), 4096))]
            if gone:
                stop = until_closed in gone
                stop_tree(pid, reap)
                while not reap():
                    time.sleep(0.05)
        code = status[0]
        return (128 - code if code < 0 else code), stop


class Forked(Exception):  # noqa: N818 (not an error: how a forked child leaves the server's loop)
    """Raised in a forked child, out of the server's loop, so that the blocks it is in close what the child must not
    keep (the listening socket, the connection, the received descriptors); :func:`main` then runs ``request``."""

    def __init__(self, request: dict, server: int):
        super().__init__("forked")
        self.request, self.server = request, server


def run_forked(request: dict, server: int, threads: dict) -> int:
    """In a forked child whose standard streams are the client's: the client's folder, environment, signals and
    threads as a new process has them, and its command (``gmpipe.cli.main``); returns its exit code, and the
    interpreter then exits as any process does (Prefect's log and event workers drained, exit handlers run)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != server:  # the server died before the line above: nobody would stop this process
        os.kill(os.getpid(), signal.SIGTERM)
    forked_at = _resident_mib()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({key: value for key, value in request["env"].items() if key != SOCKET_ENV})
    import numpy
    import torch

    import flows.stages

    # What a new process starts with: torch's threads and every BLAS / OpenMP pool's (the server imported with one),
    # torch's default generator at its initial state (the server's imports may have drawn from it), numpy's global
    # generator from fresh entropy (Python's random reseeds itself after a fork).
    set_fresh_threads(threads)
    torch.manual_seed(torch.initial_seed())
    numpy.random.seed()
    flows.stages.FORKED_AT_MIB = forked_at  # its peak memory counts the pages it shares with the server
    sys.argv = list(request["argv"])
    from gmpipe.cli import main

    return main(sys.argv[1:])


def set_fresh_threads(threads: dict) -> None:
    """Torch's threads and each loaded BLAS / OpenMP pool's as ``threads`` (:data:`FRESH_THREADS`) has them."""
    import torch
    from threadpoolctl import ThreadpoolController

    torch.set_num_threads(threads["torch"])
    for pool in ThreadpoolController().lib_controllers:
        if pool.num_threads != threads["pools"][pool.filepath]:
            pool.set_num_threads(threads["pools"][pool.filepath])


def _resident_mib() -> int | None:
    from flows.processes import own_memory_kib

    resident = own_memory_kib("VmRSS")
    return None if resident is None else round(resident / 1024)


def _die_with_parent() -> None:
    """SIGTERM to this process when its parent (the server) dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.stage_server SOCKET``: import, bind SOCKET, serve until stdin closes."""
    import gc
    import importlib.util

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m flows.stage_server SOCKET", file=sys.stderr)
        return 2
    # The code as it is before anything of it is imported (a file saved during the imports differs from it).
    code = CodeSnapshot([Path(importlib.util.find_spec("gmpipe").origin).parent, Path(__file__).parent])
    import gmpipe  # noqa: F401 (its OpenMP defaults first: a `gmpipe stage` has them in its environment too)

    environment = dict(os.environ)
    # libgomp's worker threads do not survive a fork (a child's first parallel region waits for them forever), and
    # importing torch starts them: the server imports with one OpenMP (and BLAS) thread, and each child sets the
    # numbers a new process has, asked of one (:func:`fresh_threads`).
    os.environ["OMP_NUM_THREADS"] = "1"
    probe = fresh_threads(environment)
    from flows import environment as prefect_environment

    # A `gmpipe stage` with no Prefect API configured switches to a private home and a server it starts, after the
    # stage's imports; the server imports the flow module at once, so it serves only where an API is configured (as
    # in `gmpipe pipeline`, which names its own).
    configured = prefect_environment.configure(Path.cwd(), refresh=False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pipeline stops the server by closing its stdin
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gc.disable()
    preimport()
    from threadpoolctl import ThreadpoolController

    threads = json.loads(probe.communicate()[0])
    unknown = [pool.filepath for pool in ThreadpoolController().lib_controllers
               if pool.filepath not in threads["pools"]]
    os.environ.clear()
    os.environ.update(environment)
    gc.freeze()
    gc.enable()
    # Bound under another name and renamed when ready: a stage that finds no socket yet runs in a new process at
    # once rather than waiting for the imports.
    old_mask = os.umask(0o077)
    listener.bind(argv[0] + ".starting")
    os.umask(old_mask)
    listener.listen(8)
    os.rename(argv[0] + ".starting", argv[0])
    server = StageServer(listener, Path.cwd().resolve(), environment, code, threads)
    if not configured:
        server.refusal = "no Prefect API is configured in the pipeline's environment"
    elif unknown:
        server.refusal = f"a thread pool a new process's threads were not asked of: {unknown[0]}"
    elif (changed := code.changed()) is not None:
        server.refusal = f"{changed} changed while the server imported"
    try:
        with listener:
            server.serve(sys.stdin)
    except Forked as forked:
        try:
            code = run_forked(forked.request, forked.server, threads)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        exit_without_teardown(code)
    return 0


def exit_without_teardown(code: int) -> None:
    """End this process as an interpreter ends, up to the teardown of its modules: threads joined and the threading
    module's exit callbacks run (Prefect drains its log and event workers there), then the atexit handlers, the
    standard streams flushed, and exit with ``code``. A forked stage holds every stage's modules (torch, diffusers,
    transformers, Prefect), whose teardown cost it ~1.3 s for nothing."""
    import atexit
    import threading

    threading._shutdown()  # what Py_FinalizeEx does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


FRESH_THREADS = """
import json, gmpipe, torch, numpy, scipy.linalg
from threadpoolctl import ThreadpoolController
print(json.dumps({"torch": torch.get_num_threads(),
                  "pools": {pool.filepath: pool.num_threads for pool in ThreadpoolController().lib_controllers}}))
"""


def fresh_threads(environment: dict[str, str]):
    """A process that prints, as JSON, the threads a new process has in ``environment`` once it has loaded torch,
    numpy and scipy: torch's, and each BLAS / OpenMP pool's by its library file (read its stdout)."""
    import subprocess

    return subprocess.Popen([sys.executable, "-c", FRESH_THREADS], env=environment, stdout=subprocess.PIPE, text=True)


if __name__ == "__main__":
    sys.exit(main())
