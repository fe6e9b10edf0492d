"""Sampling speed at equal quality: for every model and sampler ``evaluate`` measured, the cheapest setting whose
FD-EffNetLite0 is within ``FD_TOLERANCE`` times the guided teacher's (its default sampler and steps at the chosen
guidance weight: 50 guided Euler steps in the demo) at the same n, and its images/s against that teacher's.

Nothing is generated or measured here: the rows are a finished ``evaluate``'s under ROOT (``--root``, default the
current folder), ``reports/metrics.json`` (the family table: every model at ``evaluate.n_samples`` and each teacher
sampler at its default step count at ``evaluate.sweep_samples``; the machine and load the speeds were measured on)
and ``reports/evaluate/plots/nfe_sweep.csv`` (every sampler x step count of the teacher's NFE sweep, at
``sweep_samples``). The Frechet distance is biased by about 1/n, so a row is compared only with the teacher at its
own n. Cheapest means the fewest network evaluations per image (ties: the most images/s), not the most images/s
measured: each images/s is one wall-clock timing in ``evaluate`` (sampling and decoding, batch
``evaluate.batch_size``), so the ratios hold within that run only. ``--quick`` reads the same files.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bench.report import Section

FD_TOLERANCE = 1.10
METRICS = Path("reports") / "metrics.json"
NFE_SWEEP = Path("reports") / "evaluate" / "plots" / "nfe_sweep.csv"


@dataclass(frozen=True)
class Measured:
    """One setting evaluate measured: the curve it belongs to (``teacher SAMPLER``, a student, any other model), its
    settings, n, network evaluations per image, FD-EffNetLite0 and images/s (decoding included)."""

    family: str
    curve: str
    setting: str
    n: int
    nfe: int
    fd: float
    images_per_second: float
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class TeacherSetting:
    """The teacher setting every other is compared with: its sampler, steps and guidance weight."""

    sampler: str
    steps: int
    guidance: float

    def describe(self) -> str:
        return f"teacher (sampler={self.sampler}, steps={self.steps}, guidance={self.guidance:g})"

    def matches(self, row: Measured) -> bool:
        return row.curve == f"teacher {self.sampler}" and row.steps == self.steps and row.guidance == self.guidance


def _number(value) -> float | None:
    """A finite float from a JSON or CSV cell, else None (evaluate writes non-finite values as null)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def family_row(row: dict) -> Measured | None:
    """A row of ``metrics.json``'s ``families``, or None when it lacks an FD or an images/s."""
    fd, speed = _number(row.get("fd_effnet")), _number(row.get("images_per_second"))
    if fd is None or speed is None or row.get("nfe") is None:
        return None
    teacher = row["model"] == "teacher"
    return Measured(row["family"], f"teacher {row['sampler']}" if teacher else row["model"], row["settings"],
                    int(row["n"]), int(row["nfe"]), fd, speed, row.get("sampler"), row.get("steps"),
                    _number(row.get("guidance")))


def sweep_row(row: dict, family: str) -> Measured | None:
    """A teacher row of ``nfe_sweep.csv``, or None when it lacks an FD or an images/s."""
    fd, speed = _number(row.get("fd_effnet")), _number(row.get("images_per_second"))
    if fd is None or speed is None:
        return None
    guidance = _number(row["w"])
    return Measured(family, row["curve"], f"sampler={row['sampler']}, steps={row['steps']}, guidance={guidance:g}",
                    int(row["n"]), int(row["nfe"]), fd, speed, row["sampler"], int(row["steps"]), guidance)


def read_measurements(root: Path) -> tuple[TeacherSetting | None, list[Measured], list[str]]:
    """(the teacher reference or None, every usable measured setting, notes: which files were read and what was left
    out). Teacher rows at another guidance weight than the reference's (measured for the students' comparison) are
    left out, so each teacher curve is one sampler at one w."""
    metrics = json.loads((root / METRICS).read_text())
    machine = metrics.get("machine", {})
    precision = machine.get("generation_precision", "fp32")
    notes = [f"images/s as evaluate measured them once, on {machine.get('cpus')} CPUs, {machine.get('torch_threads')}"
             f" torch threads, device {machine.get('device')}, networks in {precision}, 1-minute load "
             f"{machine.get('load_average_1min')} when it started; read from {root / METRICS}"]
    teacher = metrics.get("teacher")
    reference = None if not teacher else TeacherSetting(teacher["sampler"], int(teacher["steps"]), float(teacher["w"]))
    rows = [family_row(row) for row in metrics.get("families", {}).values()]
    sweep = root / NFE_SWEEP
    if not sweep.is_file():
        notes.append(f"{sweep} not found: the family table's rows only")
    else:
        with open(sweep, newline="") as handle:
            reader = csv.DictReader(handle)
            if "images_per_second" not in (reader.fieldnames or []):
                notes.append(f"{sweep} has no images_per_second column (written by an older evaluate): the family "
                             "table's rows only")
            else:
                family = teacher.get("family", "latent_diffusion") if teacher else "latent_diffusion"
                # the students' rows there repeat the family table's
                rows += [sweep_row(row, family) for row in reader if row.get("model") == "teacher"]
                notes[0] += f" and {sweep}"
    skipped = sum(row is None for row in rows)
    if skipped:
        notes.append(f"{skipped} row(s) without an FD, an NFE or images/s left out")
    unique: dict[tuple, Measured] = {}
    for row in rows:
        if row is None or (reference and row.curve.startswith("teacher ") and row.guidance != reference.guidance):
            continue
        unique.setdefault((row.curve, row.n, row.nfe), row)  # a family-table row first: the sweep repeats it
    return reference, list(unique.values()), notes


def cheapest_within(rows: list[Measured], limit: float) -> Measured | None:
    """The row with the fewest network evaluations per image whose FD is at most ``limit`` (ties: the most
    images/s), or None."""
    within = [row for row in rows if row.fd <= limit]
    return min(within, key=lambda row: (row.nfe, -row.images_per_second)) if within else None


def equal_fd_rows(rows: list[Measured], reference: TeacherSetting, tolerance: float = FD_TOLERANCE) -> list[dict]:
    """Per n at which the reference teacher setting was measured, per curve at that n: the reference, the cheapest
    row within ``tolerance`` times its FD (``chosen``, None: not reached) and the curve's lowest-FD row. Rows at an
    n without the reference are not compared."""
    results = []
    for n in sorted({row.n for row in rows}, reverse=True):
        at_n = [row for row in rows if row.n == n]
        teacher = next((row for row in at_n if reference.matches(row)), None)
        if teacher is None:
            continue
        for curve in dict.fromkeys(row.curve for row in at_n):
            curve_rows = [row for row in at_n if row.curve == curve]
            results.append({"n": n, "curve": curve, "family": curve_rows[0].family, "teacher": teacher,
                            "chosen": cheapest_within(curve_rows, tolerance * teacher.fd),
                            "best": min(curve_rows, key=lambda row: row.fd)})
    return results


def section_rows(results: list[dict], tolerance: float) -> tuple[list[list], dict[str, float]]:
    """The table rows and the ratios (images/s over the teacher's, for every curve that reached the FD)."""
    rows, ratios = [], {}
    for result in results:
        chosen, teacher, best = result["chosen"], result["teacher"], result["best"]
        if chosen is None:
            rows.append([result["n"], result["family"], result["curve"], None,
                         f"not reached (lowest FD {best.fd / teacher.fd:.3g}x the teacher's, NFE {best.nfe})",
                         None, None, None, None])
            continue
        speedup = chosen.images_per_second / teacher.images_per_second
        rows.append([result["n"], result["family"], result["curve"], chosen.nfe, chosen.setting, chosen.fd,
                     chosen.fd / teacher.fd, chosen.images_per_second, speedup])
        if chosen is not teacher:  # the reference itself is 1 by definition
            ratios[f"{result['curve']} / teacher images/s at FD <= {tolerance:g}x (n={result['n']})"] = speedup
    return rows, ratios


def run(size: str = "full", root: Path | None = None, tolerance: float = FD_TOLERANCE) -> dict:
    root = Path(".") if root is None else root
    columns = ["n", "family", "model / sampler", "NFE", "cheapest setting within tolerance", "FD", "FD / teacher FD",
               "images/s", "images/s / teacher"]
    section = Section("family_speed", f"Sampling speed at equal FD: the cheapest setting of each model and sampler "
                      f"within {tolerance:g}x the guided teacher's FD at the same n", 1, columns, [])
    if not (root / METRICS).is_file():
        section.notes.append(f"not measured: {root / METRICS} not found (run the pipeline's evaluate stage, or give "
                             "--root a folder where it ran)")
        return section.finish({})
    reference, measured, notes = read_measurements(root)
    if reference is None:
        section.notes += notes + ["no teacher in metrics.json: nothing to compare with"]
        return section.finish({})
    results = equal_fd_rows(measured, reference, tolerance)
    section.rows, section.ratios = section_rows(results, tolerance)
    compared = {result["n"] for result in results}
    left = sorted({row.n for row in measured} - compared)
    section.notes += [*notes, f"reference: {reference.describe()} at each n; cheapest = fewest NFE within "
                      f"{tolerance:g}x its FD (ties: most images/s)"]
    if left:
        section.notes.append(f"n = {', '.join(map(str, left))}: no reference teacher row at that n, not compared")
    return section.finish({f"{result['curve']} (n={result['n']})": [
        {"nfe": row.nfe, "fd": row.fd, "images_per_second": row.images_per_second}
        for row in measured if row.curve == result["curve"] and row.n == result["n"]] for result in results})


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
