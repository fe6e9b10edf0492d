"""Child processes of a run (``dvc repro``, ``accelerate launch``): output streamed one finished line at a time, and
the whole tree stopped when the run stops.

Each child leads a process group of its own, so that everything it starts (the stage ``dvc`` runs, the ranks
``accelerate`` starts) can be reached with one signal, and a terminal's Ctrl-C, which reaches only the foreground
group, is forwarded by the run instead of hitting every layer at once. A stopped child gets SIGINT first, the
signal a terminal sends: ``dvc`` then waits for its stage, and the stage marks its flow run as crashed on the
server before it exits; SIGTERM and SIGKILL follow only if the group outlives a grace period.

SIGTERM (and SIGHUP) to a gmpipe command is turned into :class:`Terminated`, a ``KeyboardInterrupt``, so that it
takes the same way out as Ctrl-C: children stopped, flow runs marked, a server gmpipe started stopped; the exit code
is 143 (128 + 15; 129 for SIGHUP) instead of 130.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from gmpipe.procfs import kib_field

EXIT_INTERRUPTED = 130  # 128 + SIGINT
STOP_SIGNALS = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
# Python 3.10 has no process_group: a session of its own is a process group of its own too.
OWN_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP: the terminal went away), raised in the main thread where Ctrl-C raises
    ``KeyboardInterrupt``."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + interrupt.signum if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread."""

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, raise_terminated) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def finished_lines(stream: BinaryIO) -> Iterator[str]:
    """The lines of a child's output as a log wants them (without the newline).

    A progress bar redraws itself with carriage returns: a line's ``\\r``-separated segments collapse to the last
    one that is not blank, so a bar that redrew 500 times is one line, its final state. Only that segment and the
    one being written are kept, so a bar that never ends a line costs no memory.
    """
    pending = b""
    while chunk := stream.read1(1 << 16):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield _last_segment(line)
        if b"\r" in pending:
            *done, current = pending.split(b"\r")
            shown = next((segment for segment in reversed(done) if segment.strip()), b"")
            pending = shown + b"\r" + current
    if pending.strip():
        yield _last_segment(pending)


def _last_segment(line: bytes) -> str:
    shown = next((segment for segment in reversed(line.split(b"\r")) if segment.strip()), b"")
    return shown.decode(errors="replace").rstrip()


def run_streaming(command: list[str], on_line: Callable[[str], None], cwd: str | os.PathLike | None = None,
                  env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``command`` at the head of a new process group and hand each finished line of its output (stdout and
    stderr merged) to ``on_line``; return its exit code and all its lines.

    Whatever interrupts this process meanwhile (Ctrl-C, SIGTERM, a Prefect cancellation) first stops the child's
    whole group, then goes on.
    """
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               **OWN_PROCESS_GROUP)
    lines: list[str] = []
    try:
        _relay(process.stdout, on_line, lines)
    except BaseException:
        # Keep reading while the group stops: what it says on the way out belongs in the log, and a child blocked
        # on a full pipe would never finish stopping.
        reader = threading.Thread(target=contextvars.copy_context().run, args=(_relay, process.stdout, on_line, lines),
                                  daemon=True)
        reader.start()
        stop_group(process)
        reader.join(timeout=2.0)
        if not reader.is_alive():  # else something outside the tree holds the pipe: closing would wait for it
            process.stdout.close()
        raise
    process.stdout.close()
    return process.wait(), lines


def _relay(stream: BinaryIO, on_line: Callable[[str], None], lines: list[str]) -> None:
    for line in finished_lines(stream):
        on_line(line)
        lines.append(line)


def stop_group(process: subprocess.Popen) -> None:
    """Stop ``process``, every process in its group, and every descendant that left the group (torch starts each
    rank in a session of its own): SIGINT to the group, then SIGTERM, then SIGKILL to all of them, each after the
    previous one's grace period (:data:`STOP_SIGNALS`); returns once none is left. A second Ctrl-C while it waits
    skips to the next signal."""
    stop_tree(process.pid, process.poll)


def stop_tree(leader: int, reap: Callable[[], object]) -> None:
    """:func:`stop_group` for the process group led by ``leader``, a child of this process that ``reap`` waits for
    without blocking (``Popen.poll``, or a ``waitpid(leader, WNOHANG)``)."""
    seen: dict[int, str] = {}  # pid -> start time, of every descendant seen: parents die first and orphan the rest
    for stop_signal, grace in STOP_SIGNALS:
        _remember_descendants(leader, seen)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, stop_signal)
        if stop_signal != signal.SIGINT:
            for pid in _alive(leader, seen):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, stop_signal)
        try:
            if _wait_all_exited(leader, reap, seen, grace):
                return
        except KeyboardInterrupt:
            continue


def _wait_all_exited(leader: int, reap: Callable[[], object], seen: dict[int, str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()
        _remember_descendants(leader, seen)
        if not _alive(leader, seen):
            return True
        time.sleep(0.1)
    return False


def _process_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (parent pid, process group, state, start time) of every process, from ``/proc``."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after its last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0], fields[19])
        except (OSError, ValueError, IndexError):
            continue
    return table


def _remember_descendants(root: int, seen: dict[int, str]) -> None:
    table = _process_table()
    parents = {root} | {pid for pid, started in seen.items() if pid in table and table[pid][3] == started}
    added = True
    while added:
        added = False
        for pid, (ppid, _, _, started) in table.items():
            if ppid in parents and pid not in parents:
                seen[pid] = started
                parents.add(pid)
                added = True


def _alive(group: int, seen: dict[int, str]) -> list[int]:
    """Processes of ``group`` and those in ``seen`` (the same process: same start time) that have not exited;
    zombies, which only wait for a parent to reap them, do not count."""
    return [pid for pid, (_, pgrp, state, started) in _process_table().items()
            if state not in ("Z", "X") and (pgrp == group or seen.get(pid) == started)]


def own_memory_kib(field: str) -> int | None:
    """One memory line of this process from ``/proc/self/status`` in KiB (``VmRSS`` resident now, ``VmHWM`` its
    high-water mark), or None where the file or the line is not there."""
    return kib_field("/proc/self/status", field)
