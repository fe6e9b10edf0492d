"""Wall-clock seconds per named part of a run, so a reader of ``metrics.json`` sees where the time went.

    timer = SectionTimer(log=print)
    with timer.section("real features"):
        ...
    timer.seconds   # {"real features": 12.3, ...} in the order the parts first ran

A part entered again adds to its total (the students, one model after another). Each finished part is logged as
one line (``log``), so a long run shows its progress and its costs as it goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class SectionTimer:
    """Seconds per section name (``seconds``: name -> total wall seconds), logged as each section ends."""

    def __init__(self, log: Callable[[str], None] | None = None, prefix: str = "") -> None:
        self.seconds: dict[str, float] = {}
        self._log = log
        self._prefix = prefix

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (added to any earlier time under that name), whether it returns or raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if self._log is not None:
                self._log(f"{self._prefix}{name}: {elapsed:.1f} s")

    def rounded(self, digits: int = 2) -> dict[str, float]:
        """``seconds`` rounded for a report (``metrics.json``)."""
        return {name: round(value, digits) for name, value in self.seconds.items()}
