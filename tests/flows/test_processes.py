"""Child process trees of a run, with real processes: output relayed one finished line at a time, and the whole
tree stopped on an interrupt, also the processes that left its group (as torch's ranks do)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flows import processes
from flows.processes import Terminated, exit_code, run_streaming


def test_a_progress_bar_is_one_line_and_log_lines_stay_whole():
    script = textwrap.dedent("""
        import sys
        for step in range(1, 301):
            sys.stderr.write(f"\\rtrain: {step}/300")
            if step % 100 == 0:  # a log line through tqdm's external_write_mode: the bar is cleared first
                sys.stderr.write("\\r" + " " * 20 + "\\r")
                print(f"step {step}: loss 0.5", flush=True)
                sys.stderr.write(f"\\rtrain: {step}/300")  # and redrawn below it
        sys.stderr.write("\\n")
        print("caf\\xe9 done")
    """)
    lines: list[str] = []
    code, returned = run_streaming([sys.executable, "-c", script], lines.append)
    assert code == 0
    assert lines == returned == ["step 100: loss 0.5", "step 200: loss 0.5", "step 300: loss 0.5", "train: 300/300",
                                 "café done"]


def test_an_interrupt_stops_the_whole_tree_before_it_goes_on(tmp_path, monkeypatch):
    """A child that ignores SIGINT while its own child runs (as dvc does) and a grandchild in a session of its own
    that ignores SIGINT and SIGTERM: after Ctrl-C, all are gone before the KeyboardInterrupt reaches the caller."""
    monkeypatch.setattr(processes, "STOP_SIGNALS", ((signal.SIGINT, 1.0), (signal.SIGTERM, 1.0),
                                                    (signal.SIGKILL, 5.0)))
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); " \\
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        grandchild = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{grandchild.pid}}")
        print("ready", flush=True)
        grandchild.wait()
    """)

    def interrupt_when_ready():
        while not pids.exists():
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does: a real signal, which interrupts the blocked read

    # Ctrl-C raises KeyboardInterrupt here even when the test session was started in the background by a
    # non-interactive shell (which leaves SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    lines: list[str] = []
    started = time.monotonic()
    with contextlib.ExitStack() as restore, pytest.raises(KeyboardInterrupt):
        restore.callback(signal.signal, signal.SIGINT, previous)
        run_streaming([sys.executable, "-c", script], lines.append)
    assert time.monotonic() - started < 15
    assert lines == ["ready"]
    for pid in map(int, pids.read_text().split()):
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] \
            == "Z"


def test_sigterm_and_sighup_exit_codes():
    assert exit_code(KeyboardInterrupt()) == 130
    assert exit_code(Terminated(signal.SIGTERM)) == 143
    assert exit_code(Terminated(signal.SIGHUP)) == 129
    with processes.sigterm_as_interrupt(), pytest.raises(Terminated) as raised:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert raised.value.signum == signal.SIGTERM
