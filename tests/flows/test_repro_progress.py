"""What the pipeline's task run for a stage concludes from the output of its one `dvc repro`, line by line as DVC
3 writes it (no server: the task's plain function), and the record of a run it writes."""

from __future__ import annotations

import json
import subprocess

import pytest

from flows.pipeline import ReproProgress, RunRecord, StageOutcome, code_version, follow_stage, outcome_table


def progress_after(*lines: str, exit_code: int | None = None, reason: str = "", interrupted: bool = False):
    progress = ReproProgress()
    for line in lines:
        progress.read_line(line)
    if exit_code is not None:
        progress.exited(exit_code, reason)
    if interrupted:
        progress.interrupted()
    return progress


def outcomes(progress: ReproProgress, stages: list[str]) -> list:
    """Each stage's result in order, as the pipeline follows them: a value, or (state type, message)."""
    found = []
    for stage in stages:
        result = follow_stage.fn(stage, progress)
        found.append(result if isinstance(result, str) else (result.type.value, result.message))
        if not isinstance(result, str):
            break
    return found


def test_stages_that_ran_or_were_up_to_date_complete():
    progress = progress_after("Stage 'prepare' didn't change, skipping", "Running stage 'train_vae':",
                              "> gmpipe stage train_vae", "Updating lock file 'dvc.lock'",
                              "Stage 'cache_latents' is cached - skipping run, checking out outputs",
                              "WARNING: stage: 'train_ldm' is frozen. Its dependencies are not going to be reproduced.",
                              "Verifying outputs in frozen stage: 'train_ldm'", "Running stage 'distill':",
                              "Use `dvc push` to send your updates to remote storage.", exit_code=0)
    assert outcomes(progress, ["prepare", "train_vae", "cache_latents", "train_ldm", "distill"]) == [
        "up to date", "ran", "up to date", "frozen", "ran"]


def test_the_stage_dvc_stopped_at_fails_with_the_reason():
    progress = progress_after("Running stage 'prepare':", "Running stage 'train_vae':", exit_code=255,
                              reason="stage 'train_vae' failed: out of memory")
    assert outcomes(progress, ["prepare", "train_vae", "cache_latents"]) == [
        "ran", ("FAILED", "dvc repro failed (exit 255): stage 'train_vae' failed: out of memory")]


@pytest.mark.parametrize(("lines", "exit_code", "expected"), [
    ((), 255, ("FAILED", "dvc repro failed (exit 255): missing dependency")),  # refused before it started
    ((), 0, ("FAILED", "dvc repro finished without running or skipping this stage")),
    (("Running stage 'train_vae':",), 0, ("FAILED", "dvc reported stage 'train_vae' where 'prepare' was due")),
])
def test_a_stage_dvc_did_not_run_is_not_reported_as_done(lines, exit_code, expected):
    assert outcomes(progress_after(*lines, exit_code=exit_code, reason="missing dependency"), ["prepare"]) == [
        expected]


def test_an_interrupt_crashes_the_running_stage_and_cancels_the_next():
    progress = progress_after("Running stage 'prepare':", interrupted=True)
    assert follow_stage.fn("prepare", progress).type.value == "CRASHED"
    state = follow_stage.fn("train_vae", progress)
    assert (state.type.value, state.message) == ("CANCELLED", "not run: the pipeline was interrupted")


def test_the_resources_a_stage_prints_are_read_behind_a_log_prefix():
    progress = progress_after(
        "Running stage 'prepare':",
        "22:54:27.603 | INFO    | Flow run 'immortal-rabbit' - gmpipe: stage prepare took 4.2 s, peak memory 312 MiB",
        "Running stage 'train_vae':",
        "gmpipe: stage train_vae took 612.0 s, peak memory 1890 MiB (forked by the stage server at 497 MiB)",
        exit_code=0,
    )
    assert progress.resources == {"prepare": (4.2, 312, None), "train_vae": (612.0, 1890, 497)}
    assert outcomes(progress, ["prepare", "train_vae"]) == ["ran", "ran"]


def test_the_table_keeps_a_sub_second_stage_time_visible():
    table = outcome_table({
        "prepare": StageOutcome("ran", 3.14, 0.043, 123),
        "train_vae": StageOutcome("ran", 615.04, 612.0, 1890),
        "train_ldm": StageOutcome("up to date", 0.8),
    })
    assert "| prepare | ran | 3.1 s | 0.04 s | 123 MiB |" in table
    assert "| train_vae | ran | 615.0 s | 612.0 s | 1890 MiB |" in table
    assert "| train_ldm | up to date | 0.80 s | - | - |" in table


def test_the_run_record_names_the_commit_and_every_stage(tmp_path):
    def git(*arguments):
        subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.invalid", *arguments], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    assert code_version(tmp_path) is None  # no commit yet
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("add", "params.yaml")
    git("commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert code_version(tmp_path) == head
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert code_version(tmp_path) == f"{head}-dirty"

    stages = {"prepare": StageOutcome("up to date", 0.8), "train_vae": StageOutcome("ran", 615.04, 612.0, 1890, 497)}
    record = RunRecord("2026-01-02T03:04:05+00:00", code_version(tmp_path), ["prepare", "train_vae"], False, True, 2,
                       [1.5, 1.0, 0.5], [2.0, 1.2, 0.6], 640.25, stages)
    written = json.loads(record.write(tmp_path).read_text())
    assert written == {
        "date": "2026-01-02T03:04:05+00:00", "commit": f"{head}-dirty", "stages_selected": ["prepare", "train_vae"],
        "all_stages": False, "force": True, "cpus": 2, "load_average_start": [1.5, 1.0, 0.5],
        "load_average_end": [2.0, 1.2, 0.6], "repro_seconds": 640.25,
        "stages": {"prepare": {"outcome": "up to date", "wall_seconds": 0.8, "stage_seconds": None,
                               "peak_memory_mib": None, "forked_at_mib": None},
                   "train_vae": {"outcome": "ran", "wall_seconds": 615.04, "stage_seconds": 612.0,
                                 "peak_memory_mib": 1890, "forked_at_mib": 497}}}
    assert stages["train_vae"].row("train_vae") == "| train_vae | ran | 615.0 s | 612.0 s | 1890 MiB (forked at 497) |"
    assert (tmp_path / "reports" / "pipeline_run.json").is_file()
