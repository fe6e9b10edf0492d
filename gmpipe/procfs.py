"""Lines of Linux's ``/proc`` files of the form ``Field:   N kB`` (``/proc/meminfo``, ``/proc/self/status``).

Torch-free and cheap to import: the stage server reads its own memory with it before any stage loads torch."""

from __future__ import annotations

from pathlib import Path


def kib_field(path: str | Path, field: str) -> int | None:
    """The number on ``path``'s ``field:`` line (KiB for the memory lines), or None where the file or the line is
    not there (not Linux, another kernel's layout)."""
    try:
        text = Path(path).read_text(errors="replace")  # /proc/self/status's Name: line may be cut mid-character
    except OSError:
        return None
    prefix = f"{field}:"
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return int(line.split()[1])
            except (ValueError, IndexError):
                return None
    return None
