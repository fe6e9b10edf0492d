"""The pipeline's record of a run (written by flows.pipeline.RunRecord) as a bench section: wall time, own time,
orchestration and peak memory per stage, and the 15-minute target only for a run of every stage."""

from __future__ import annotations

import pytest

from bench import demo_stages
from flows.pipeline import RUN_RECORD, StageOutcome
from tests.bench.fixtures import write_pipeline_run


def test_the_section_reads_the_file_the_pipeline_writes(tmp_path):
    assert write_pipeline_run(tmp_path) == tmp_path / RUN_RECORD == tmp_path / demo_stages.RUN_RECORD
    section = demo_stages.run("quick", tmp_path)
    rows = {row[0]: row for row in section["rows"]}
    assert rows["train_vae"] == ["train_vae", "ran", 512.0, 508.5, pytest.approx(3.5), 2152, None]
    assert rows["total"][1:] == ["3 of 3 ran", pytest.approx(640.5), pytest.approx(632.5), pytest.approx(8.0), 2152,
                                 None]
    assert section["ratios"] == {"stage time / wall time (stages that ran)": pytest.approx(632.5 / 640.5)}
    # Every stage of dvc.yaml ran: the target is judged on the dvc repro's wall time (700 s = 11.7 min).
    assert section["targets"] == {"every stage in dvc repro <= 15 min": {"value": pytest.approx(700 / 60),
                                                                          "met": True}}
    note = section["notes"][-1]
    assert "2026-01-02T03:04:05+00:00, code abc1234, 2 CPUs" in note and "[0.5, 0.4, 0.3] before" in note


def test_a_partial_run_or_a_skipped_stage_is_not_judged_against_the_demo_target(tmp_path):
    write_pipeline_run(tmp_path, all_stages=False, repro_seconds=100.0)
    assert demo_stages.run("quick", tmp_path)["targets"] == {}
    write_pipeline_run(tmp_path, outcomes={"prepare": StageOutcome("up to date", 0.7),
                                           "train_vae": StageOutcome("ran", 1000.0, 990.0, 2000)}, repro_seconds=1001)
    section = demo_stages.run("quick", tmp_path)
    assert section["targets"] == {}
    rows = {row[0]: row for row in section["rows"]}
    assert rows["prepare"] == ["prepare", "up to date", 0.7, None, None, None, None]
    assert rows["total"][1:] == ["1 of 2 ran", pytest.approx(1000.7), 990.0, 10.0, 2000, None]
    # A stage the pipeline's stage server forked: the resident memory it started at beside its peak.
    write_pipeline_run(tmp_path, outcomes={"train_vae": StageOutcome("ran", 1000.0, 999.0, 1900, 497)},
                       repro_seconds=1001)
    assert {row[0]: row for row in demo_stages.run("quick", tmp_path)["rows"]}["train_vae"][5:] == [1900, 497]
    write_pipeline_run(tmp_path, repro_seconds=1000.0)
    assert demo_stages.run("quick", tmp_path)["targets"]["every stage in dvc repro <= 15 min"]["met"] is False


def test_without_a_run_record_the_section_says_so(tmp_path):
    section = demo_stages.run("quick", tmp_path)
    assert section["rows"] == [] and section["ratios"] == {} and "not found" in section["notes"][0]
