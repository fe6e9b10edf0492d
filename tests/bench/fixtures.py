"""Small files of a finished project for the sections that read rather than measure: an ``evaluate`` output
(``reports/metrics.json`` and the NFE sweep) and a pipeline run record (``reports/pipeline_run.json``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from flows.pipeline import RunRecord, StageOutcome

SWEEP_COLUMNS = ["curve", "model", "sampler", "steps", "nfe", "w", "n", "fd_effnet", "kid", "accuracy",
                 "images_per_second"]


def family(model: str, settings: dict, nfe: int, n: int, fd: float, speed: float, family_name="latent_diffusion"):
    """A family-table row as ``gmpipe.eval.families.family_row`` writes it (the fields the bench reads)."""
    described = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                          for key, value in settings.items())
    return {"family": family_name, "model": model, "settings": described, **settings, "nfe": nfe, "n": n,
            "fd_effnet": fd, "floor_fd_effnet": 10.0, "fd_minus_floor": fd - 10.0, "images_per_second": speed}


def write_evaluate_output(root: Path, sweep_speeds: bool = True) -> None:
    """An evaluate run: the teacher (50 Euler steps at w = 1) at n = 100 beside students, a GAN and a teacher row at
    w = 2; a student row at n = 60 with no teacher there; the NFE sweep of two samplers at n = 40 (their rows at 50
    steps in the family table too). Without
    ``sweep_speeds`` the sweep file lacks its images/s column, as an older evaluate wrote it."""
    teacher = {"sampler": "euler", "steps": 50, "guidance": 1.0, "shift": 1.0}
    rows = [
        family("teacher", teacher, 100, 100, 100.0, 10.0),
        family("teacher", {**teacher, "guidance": 2.0}, 100, 100, 95.0, 50.0),  # another w: left out
        family("student:a", {"sampler": "ddim", "steps": 1, "guidance": 0.0}, 1, 100, 120.0, 200.0),  # 1.2x
        family("student:a", {"sampler": "ddim", "steps": 2, "guidance": 0.0}, 2, 100, 108.0, 150.0),  # within
        family("student:a", {"sampler": "ddim", "steps": 4, "guidance": 0.0}, 4, 100, 101.0, 300.0),  # within, more NFE
        family("student:b", {"sampler": "euler", "steps": 1, "guidance": 0.0}, 1, 100, 130.0, 220.0),  # never within
        family("gan", {"truncation": 1.0}, 1, 100, 109.9, 400.0, "latent_gan"),
        family("student:a", {"sampler": "ddim", "steps": 1, "guidance": 0.0}, 1, 60, 50.0, 500.0),  # no teacher at 60
        family("teacher", teacher, 100, 40, 80.0, 12.0),  # each sweep sampler at its default steps, as in the sweep
        family("teacher", {**teacher, "sampler": "heun"}, 198, 40, 80.5, 4.0),
    ]
    metrics = {"machine": {"cpus": 2, "torch_threads": 2, "load_average_1min": 0.25, "device": "cpu"},
               "teacher": {"model": "teacher", "sampler": "euler", "steps": 50, "w": 1.0, "n": 100, "nfe": 100,
                           "fd_effnet": 100.0, "images_per_second": 10.0, "family": "latent_diffusion"},
               "families": {f"{row['model']} ({row['settings']}, n={row['n']})": row for row in rows}}
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "metrics.json").write_text(json.dumps(metrics, indent=2))
    sweep = [("euler", 4, 8, 120.0, 100.0), ("euler", 8, 16, 87.0, 60.0), ("euler", 16, 32, 81.0, 30.0),
             ("euler", 50, 100, 80.0, 12.0), ("heun", 4, 14, 85.0, 40.0), ("heun", 50, 198, 80.5, 4.0)]
    plots = root / "reports" / "evaluate" / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    columns = SWEEP_COLUMNS if sweep_speeds else SWEEP_COLUMNS[:-1]
    with open(plots / "nfe_sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for sampler, steps, nfe, fd, speed in sweep:
            writer.writerow({"curve": f"teacher {sampler}", "model": "teacher", "sampler": sampler, "steps": steps,
                             "nfe": nfe, "w": 1.0, "n": 40, "fd_effnet": fd, "kid": 0.1, "accuracy": 0.9,
                             "images_per_second": speed})
        writer.writerow({"curve": "student:a", "model": "student:a", "sampler": "ddim", "steps": 1, "nfe": 1,
                         "w": 1.0, "n": 100, "fd_effnet": 120.0, "kid": 0.2, "accuracy": 0.8})  # repeats a family row


def write_pipeline_run(root: Path, all_stages: bool = True, outcomes: dict[str, StageOutcome] | None = None,
                       repro_seconds: float = 700.0) -> Path:
    """A record as ``gmpipe pipeline`` writes it (``flows.pipeline.RunRecord``)."""
    outcomes = outcomes or {"prepare": StageOutcome("ran", 3.5, 1.1, 273),
                            "train_vae": StageOutcome("ran", 512.0, 508.5, 2152),
                            "cache_latents": StageOutcome("ran", 125.0, 122.9, 1102)}
    return RunRecord("2026-01-02T03:04:05+00:00", "abc1234", list(outcomes), all_stages, False, 2, [0.5, 0.4, 0.3],
                     [1.9, 1.5, 0.9], repro_seconds, outcomes).write(root)
