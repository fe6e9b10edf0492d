"""The demo's wall time and peak memory per stage, as ``gmpipe pipeline`` recorded them in
``reports/pipeline_run.json`` (``flows.pipeline.RunRecord``) under ROOT (``--root``, default the current folder).

Nothing is run here: each stage's wall time inside the pipeline's one ``dvc repro`` (DVC's own work on it included),
the time and peak resident memory its own process reported, and the difference, what orchestration cost it. The run's
date, code version and load average before and after say which run and how quiet the machine was; the 15-minute
target (issue 17) is judged only on a run of every stage of ``dvc.yaml``, each of which ran. ``--quick`` reads the
same file.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import Section

RUN_RECORD = Path("reports") / "pipeline_run.json"  # flows.pipeline.RUN_RECORD, without importing Prefect
DEMO_LIMIT_MINUTES = 15.0


def stage_rows(stages: dict[str, dict]) -> list[list]:
    """One row per stage: outcome, wall s, own s, orchestration s (wall - own; stages that ran), peak MiB, and the
    resident MiB it started at when the pipeline's stage server forked it (pages shared with the server, which its
    peak counts; None for a stage that ran in a new process)."""
    rows = []
    for stage, record in stages.items():
        wall, own = record.get("wall_seconds"), record.get("stage_seconds")
        ran = record["outcome"] == "ran"
        rows.append([stage, record["outcome"], wall, own if ran else None,
                     wall - own if ran and wall is not None and own is not None else None,
                     record.get("peak_memory_mib") if ran else None, record.get("forked_at_mib") if ran else None])
    return rows


def run(size: str = "full", root: Path | None = None) -> dict:
    root = Path(".") if root is None else root
    path = root / RUN_RECORD
    section = Section("demo_stages", "Pipeline run: wall time and peak memory per stage", 1,
                      ["stage", "outcome", "wall s (in dvc repro)", "stage s (own)", "orchestration s",
                       "peak MiB", "forked at MiB"], [])
    if not path.is_file():
        section.notes.append(f"not measured: {path} not found (`gmpipe pipeline` writes it after a run that "
                             "succeeds; give --root the project folder)")
        return section.finish({})
    record = json.loads(path.read_text())
    stages = record["stages"]
    section.rows = stage_rows(stages)
    ran = [row for row in section.rows if row[1] == "ran" and row[3] is not None and row[2]]
    walls = sum(row[2] for row in section.rows if row[2] is not None)
    section.rows.append(["total", f"{len(ran)} of {len(stages)} ran", walls, sum(row[3] for row in ran),
                         sum(row[4] for row in ran), max((row[5] for row in ran if row[5] is not None), default=None),
                         None])
    if ran:
        section.ratios["stage time / wall time (stages that ran)"] = sum(r[3] for r in ran) / sum(r[2] for r in ran)
    minutes = record["repro_seconds"] / 60
    if record.get("all_stages") and len(ran) == len(stages):
        section.target(f"every stage in dvc repro <= {DEMO_LIMIT_MINUTES:g} min", minutes,
                       minutes <= DEMO_LIMIT_MINUTES)
    else:
        section.notes.append(f"the {DEMO_LIMIT_MINUTES:g}-minute target is not judged: the run was not every stage "
                             "of dvc.yaml, each run")
    section.notes.append(f"run of {record['date']}, code {record.get('commit') or 'unknown'}, {record.get('cpus')} "
                         f"CPUs, load average (1/5/15 min) {record['load_average_start']} before and "
                         f"{record['load_average_end']} after; dvc repro took {record['repro_seconds']:.1f} s "
                         f"({minutes:.1f} min); read from {path}")
    return section.finish({stage: [values] for stage, values in stages.items()})


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
