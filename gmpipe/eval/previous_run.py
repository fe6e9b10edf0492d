"""This run beside the previous one: the metrics last committed to git (``HEAD``), which is also what
``dvc metrics diff`` compares the workspace with, and inside ``dvc exp run`` the experiment's baseline commit.

Why git and not a copy kept by ``evaluate``: ``dvc repro`` deletes a stage's outputs before it runs, so a file
kept beside them would be gone, and a copy outside the outputs would be an undeclared artifact. The committed
``reports/metrics.json`` is the run someone chose to keep.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The family table columns compared (gmpipe.eval.families), lower is better except where listed in HIGHER_IS_BETTER.
COMPARED = ("fd_effnet", "fd_minus_floor", "kid", "precision", "recall", "accuracy", "likelihood")
HIGHER_IS_BETTER = ("precision", "recall", "accuracy")


@dataclass(frozen=True)
class CommittedRun:
    """``metrics`` as committed in ``commit`` (short hash, date and subject in ``description``)."""

    metrics: dict
    commit: str
    description: str


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)


def committed_metrics(root: Path, relative: str = "reports/metrics.json") -> CommittedRun | None:
    """The file at ``HEAD`` of the git repository holding ``root``, parsed as JSON; None when there is no git, no
    commit, the file was never committed, or it does not parse."""
    try:
        shown = _git(root, "show", f"HEAD:{relative}")
        if shown.returncode != 0:
            return None
        metrics = json.loads(shown.stdout)
        logged = _git(root, "log", "-1", "--format=%h%x00%cs %s", "HEAD", "--", relative)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None
    commit, _, description = logged.stdout.strip().partition("\0")
    return CommittedRun(metrics, commit or "HEAD", description) if isinstance(metrics, dict) else None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def compare_families(current: dict, previous: dict) -> list[dict]:
    """One row per family table row (``metrics.json`` ``families``, keyed ``model (settings, n=N)``) in either run:
    each compared column's previous value, this run's and the change; None where a run has no such row or value.
    Rows of this run come first, in its order, then rows only the previous run had."""
    now, before = current.get("families") or {}, previous.get("families") or {}
    rows = []
    for key in [*now, *(k for k in before if k not in now)]:
        row = {"row": key}
        for column in COMPARED:
            new, old = _number((now.get(key) or {}).get(column)), _number((before.get(key) or {}).get(column))
            row[column] = (old, new, None if new is None or old is None else new - old)
        rows.append(row)
    return rows


# The single numbers outside the family table: (name, metrics.json section, key, higher is better).
SUMMARY = (("autoencoder PSNR (dB)", "vae", "psnr", True), ("autoencoder SSIM", "vae", "ssim", True),
           ("autoencoder FD / floor", "vae", "fd_ratio", False),
           ("classifier test accuracy", "classifier", "test_accuracy", True))


def summary_changes(current: dict, previous: dict) -> list[tuple[str, float | None, float | None, bool]]:
    """(name, previous, this run, higher is better) for each number of ``SUMMARY`` either run has."""
    changes = []
    for name, section, key, higher_is_better in SUMMARY:
        old, new = _number((previous.get(section) or {}).get(key)), _number((current.get(section) or {}).get(key))
        if old is not None or new is not None:
            changes.append((name, old, new, higher_is_better))
    return changes
