"""Interleaved timing: every case once per round, rounds repeated, medians and paired ratios.

A shared machine drifts (another job starts, the CPU heats up); running the cases one after another in
each round, in a rotated order, exposes them to the same drift, and the ratio taken inside each round cancels
most of it. Reported ratios are medians over rounds of those per-round ratios; n is the number of rounds.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any


def interleave(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """What each case returned (seconds, or a dict of seconds), once per round, in a rotated order:
    round r starts with case r mod k, so no case always runs first (or right after the same neighbour)."""
    names = list(cases)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(cases[name]())
    return results


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """A case that runs ``fn`` once and returns its wall-clock seconds."""

    def case() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return case


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def speedup(seconds: list[float], baseline_seconds: list[float]) -> float:
    """Median over rounds of baseline / case time: > 1 means the case is faster than the baseline."""
    return median([b / s for s, b in zip(seconds, baseline_seconds, strict=True)])


def spread(values: list[float]) -> str:
    """min-max of a list, for the tables: how much the rounds disagreed."""
    return f"{min(values):.3g}-{max(values):.3g}"


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Swallow progress bars of library calls that are timed many times (their cost is still measured)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
