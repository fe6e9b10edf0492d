"""What the pipeline's task run for a stage concludes from the output of its one `dvc repro`, line by line as DVC
3 writes it (no server: the task's plain function)."""

from __future__ import annotations

import pytest

from flows.pipeline import ReproProgress, StageOutcome, follow_stage, outcome_table


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
        "gmpipe: stage train_vae took 612.0 s, peak memory 1890 MiB",
        exit_code=0,
    )
    assert progress.resources == {"prepare": (4.2, 312), "train_vae": (612.0, 1890)}
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
