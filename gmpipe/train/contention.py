"""Other processes on the cores a training run computes on, measured while it trains.

On a CPU, torch's OpenMP threads spin while they wait for the next parallel region (``gmpipe/__init__.py``). When
another busy process shares the cores, a thread of ours waits for a sibling that has been descheduled, and a step can
take 4-40x longer (``python -m bench.thread_policy``; README "Threads"); one thread per process does not slow down.
gmpipe does not switch threads by itself, since a result would then depend on what else ran (the thread count can
change a float sum's order), so the loop measures instead and says once what to change.

Between two log points the loop reads the busy time of the CPUs in its affinity mask (``/proc/stat``) and subtracts
its own CPU time: what is left is the other processes' share, in cores. When it exceeds what the cores the run's
threads leave free can absorb (``others > cores - threads + MARGIN``) in every window for at least
``SUSTAINED_SECONDS`` (a pipeline's own short work beside a stage, such as its stage server importing for a few
seconds, does not count), the run prints one line naming ``compute.threads``. Where ``/proc/stat`` is not there (not
Linux) the check is off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

# Cores' worth of other work tolerated beyond the free cores: a Prefect server, a shell, a tail -f stay below it.
MARGIN = 0.5
# How long other work must keep the cores before the line is printed.
SUSTAINED_SECONDS = 10.0
PROC_STAT = Path("/proc/stat")


def busy_seconds(cpus: set[int], proc_stat: Path = PROC_STAT) -> float | None:
    """CPU time spent not idle on ``cpus`` since boot, in seconds (user, nice, system, irq, softirq and steal
    ticks of their ``cpuN`` lines); None where the file or a line is missing."""
    try:
        lines = proc_stat.read_text().splitlines()
    except OSError:
        return None
    ticks, seen = 0, set()
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            values = [int(value) for value in rest.split()]
        except ValueError:
            return None
        if cpu in cpus and len(values) >= 4:
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            ticks += sum(values[:8]) - idle  # guest time is already inside user
            seen.add(cpu)
    if seen != cpus:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


class Contention:
    """Call :meth:`check` at each log point; it returns (and hands ``log``, once per run) the warning line when
    other processes took more of the cores than the run's ``threads`` leave free, else None.

    ``busy`` (seconds of non-idle CPU time on the run's cores) and ``own`` (this process's CPU seconds) and ``clock``
    are injectable for tests."""

    def __init__(self, threads: int, description: str, log: Callable[[str], None] = print,
                 cpus: set[int] | None = None, busy: Callable[[], float | None] | None = None,
                 own: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic):
        self.cpus = cpus if cpus is not None else _affinity()
        self.threads, self.description, self.log = threads, description, log
        self._busy = busy or (lambda: busy_seconds(self.cpus))
        self._own, self._clock = own, clock
        self.warned = False
        self._last = self._read()
        self._since: tuple[float, float] | None = None  # (start, cores-seconds of other work) of the contended stretch

    def _read(self) -> tuple[float, float, float] | None:
        busy = self._busy()
        return None if busy is None else (busy, self._own(), self._clock())

    def others(self) -> tuple[float, float] | None:
        """(cores' worth of CPU time other processes used on the run's cores since the last call, the seconds since
        then); None when unknown."""
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[2] - last[2] <= 0:
            return None
        seconds = now[2] - last[2]
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])) / seconds, seconds

    def check(self) -> str | None:
        measured = self.others()
        cores = len(self.cpus)
        if measured is None or measured[0] <= max(0, cores - self.threads) + MARGIN:
            self._since = None
            return None
        others, seconds = measured
        start, core_seconds = self._since or (self._clock() - seconds, 0.0)
        self._since = (start, core_seconds + others * seconds)
        elapsed = self._clock() - start
        if self.warned or elapsed < SUSTAINED_SECONDS:
            return None
        self.warned = True
        line = (f"{self.description}: other processes are using {self._since[1] / elapsed:.1f} of the {cores} "
                f"cores this run's "
                f"{self.threads} threads compute on; threads that share cores with other work can run 4-40x slower "
                "(README: Threads). On a shared machine set compute.threads: 1 in params.yaml (dvc exp run -S "
                "compute.threads=1); results may then differ in float rounding from runs at other thread counts")
        self.log(line)
        return line


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))
