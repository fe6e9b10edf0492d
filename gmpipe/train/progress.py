"""Progress of long work for whoever watches it, without the library knowing who that is.

The training loop (and any other long job) calls :func:`report` at each logging boundary; an orchestrator (the
Prefect flows in ``flows/``) registers a listener with :func:`listening` to turn those events into a progress
artifact or one log line per interval. With no listener, :func:`report` costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of the job ``description`` (e.g. optimizer steps), with the latest metrics."""

    description: str
    done: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 1.0


Listener = Callable[[ProgressEvent], None]
_listeners: list[Listener] = []


def report(event: ProgressEvent) -> None:
    """Hand ``event`` to every registered listener; a failing listener never stops the work."""
    for listener in list(_listeners):
        with contextlib.suppress(Exception):
            listener(event)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Register ``listener`` for the length of the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
