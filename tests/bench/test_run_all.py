"""The benchmark runner at tiny sizes: every section runs, and bench.json and bench.md are written. The project
given as --root holds no models (the sections that run models use random ones) but an evaluate output and a
pipeline run record, which family_speed and demo_stages read."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.run_all import SECTIONS
from tests.bench.fixtures import write_evaluate_output, write_pipeline_run
from tests.conftest import REPO


@pytest.mark.slow  # about 25 s: the orchestration section runs `dvc repro` with a Prefect flow
def test_quick_run_writes_every_section_with_finite_ratios(tmp_path):
    project = tmp_path / "project"
    write_evaluate_output(project)
    write_pipeline_run(project)
    command = [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(tmp_path), "--root",
               str(project)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["sections"]) == list(SECTIONS)
    for name, section in report["sections"].items():
        assert section["ratios"], f"{name}: no ratios"
        for ratio, value in section["ratios"].items():
            assert math.isfinite(value) and value > 0, f"{name}: {ratio} = {value}"
        assert section["n"] >= 1 and section["rows"] and section["seconds"] > 0
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["cpu"]
    assert report["sections"]["orchestration"]["targets"]
    markdown = (tmp_path / "bench.md").read_text()
    assert all(section["title"] in markdown for section in report["sections"].values())
