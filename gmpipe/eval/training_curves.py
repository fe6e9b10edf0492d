"""The loss curves a training stage logged: dvclive's plot files under ``reports/<stage>/live/plots/metrics``.

``gmpipe.train.loop.MetricLog`` writes one tab-separated file per logged term (``step`` and the value, a row per
``log_every`` steps), named by the term: ``autoencoder/kl`` is ``autoencoder/kl.tsv``. They are rebuilt from the
checkpoint's history on every run, so they are complete after a resume.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

# Logged beside the losses but not a loss: left out of the curves.
NOT_A_LOSS = ("lr",)


def read_curves(live_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """{term: [(step, value), ...]} for every ``*.tsv`` under ``live_dir/plots/metrics``, sorted by term; {} when
    the folder is missing. Rows that do not parse as numbers and non-finite values are skipped."""
    root = Path(live_dir) / "plots" / "metrics"
    curves = {}
    for file in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        term = file.relative_to(root).with_suffix("").as_posix()
        if term in NOT_A_LOSS:
            continue
        points = []
        with file.open(newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                try:
                    step, value = float(row["step"]), float(row[file.stem])
                except (KeyError, TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    points.append((step, value))
        if points:
            curves[term] = points
    return curves
