"""Prefect + DVC for real: a local Prefect server, scratch git/DVC repos, `dvc repro` through the CLI."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmpipe.stages import STAGES
from tests.conftest import REPO, prefect_reads_the_environment, run, smoke_params


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_flows_run_in_the_test_process_report_to_the_session_server(prefect_api):
    # Prefect may have been imported (by another test module) before the session server existed; its settings must
    # still name that server, or in-process flows would start a temporary server of their own.
    import prefect  # noqa: F401
    from prefect.settings import get_current_settings

    assert get_current_settings().api.url == prefect_api


def test_a_prefect_imported_before_the_settings_reads_them_once_told(monkeypatch):
    import prefect  # noqa: F401
    from prefect.settings import get_current_settings

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    try:
        prefect_reads_the_environment()
        assert get_current_settings().api.url == "http://127.0.0.1:9/api"
    finally:
        monkeypatch.undo()
        prefect_reads_the_environment()


@pytest.mark.slow
def test_pipeline_flow_runs_dvc_repro_then_skips(prefect_api, dvc_project):
    root = dvc_project(smoke_params(prepare={"max_per_class": 5}))
    first = run(["gmpipe", "pipeline", "prepare"], root)
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"]["total"] == 50
    assert (root / "dvc.lock").is_file()
    assert "Running stage 'prepare'" in first.stdout + first.stderr

    # Bytecode caches written beside the code (as any Python run without PYTHONDONTWRITEBYTECODE writes them) are not
    # a change of the code folders the stage depends on.
    run([sys.executable, "-m", "compileall", "-q", "gmpipe", "flows"], root)
    assert (root / "gmpipe" / "data" / "__pycache__").is_dir()
    second = run(["dvc", "repro", "prepare"], root)
    assert "didn't change, skipping" in second.stdout

    # A params change of the stage's own section reruns it.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["max_per_class"] = 6
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(["dvc", "repro", "prepare"], root)
    assert json.loads((root / "data/prepared/manifest.json").read_text())["counts"]["train"]["total"] == 60

    markdown = [a.data for a in _artifacts("prepare")]
    assert any("data/prepared" in text and "train" in text for text in markdown)
    # The pipeline's table: wall time in dvc repro, and the stage's own time and peak memory, as it printed them.
    row = re.compile(r"\| prepare \| ran \| ([\d.]+) s \| ([\d.]+) s \| (\d+) MiB \|")
    printed = row.search(first.stdout + first.stderr)
    assert printed and float(printed.group(1)) >= float(printed.group(2)) > 0 and 50 < int(printed.group(3)) < 4096
    assert any(row.search(a.data) for a in _artifacts("pipeline"))
    # The same figures in reports/pipeline_run.json (what `python -m bench` tabulates), with the run's context.
    record = json.loads((root / "reports/pipeline_run.json").read_text())
    stage = record["stages"]["prepare"]
    assert stage["outcome"] == "ran" and stage["peak_memory_mib"] == int(printed.group(3))
    # The table shows tenths of the time the record keeps to thousandths: at most half a tenth apart, and the float
    # error of the subtraction (10.75 - 10.7 > 0.05, from 10.7496 printed 10.7 and kept as 10.75).
    assert abs(stage["wall_seconds"] - float(printed.group(1))) <= 0.05 + 1e-9
    # The stage's time in hundredths: half of one, and the same float error (0.415 - 0.41 > 0.005).
    assert abs(stage["stage_seconds"] - float(printed.group(2))) <= 0.005 + 1e-9
    assert record["repro_seconds"] >= stage["wall_seconds"] and record["stages_selected"] == ["prepare"]
    assert record["all_stages"] is False and record["force"] is False and record["commit"] is None  # no commit yet
    assert len(record["load_average_start"]) == len(record["load_average_end"]) == 3 and record["cpus"] >= 1
    assert record["date"].endswith("+00:00")

    # On a clean commit the record names it as the run started, though the run rewrites dvc.lock and the reports.
    params["prepare"]["max_per_class"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "four per class"], root)
    head = run(["git", "rev-parse", "--short", "HEAD"], root).stdout.strip()
    run(["gmpipe", "pipeline", "prepare"], root)
    assert run(["git", "status", "--porcelain"], root).stdout.strip()  # the run changed tracked files
    assert json.loads((root / "reports/pipeline_run.json").read_text())["commit"] == head


def test_stage_reports_bad_params_without_traceback(prefect_api, dvc_project):
    root = dvc_project(smoke_params(data={"image_size": 2}))
    result = run(["gmpipe", "stage", "prepare"], root, check=False)
    assert result.returncode == 2
    assert "data.image_size: must be >= 8 (got 2)" in result.stderr
    assert "Traceback" not in result.stderr


def test_stage_failure_is_one_clear_line_and_keeps_outputs(prefect_api, dvc_project):
    root = dvc_project(smoke_params(prepare={"max_per_class": 3}))
    run(["gmpipe", "stage", "prepare"], root)
    before = (root / "data/prepared/manifest.json").read_text()
    params = smoke_params(data={"path": str(root / "missing")})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = run(["gmpipe", "stage", "prepare"], root, check=False)
    assert result.returncode == 1
    assert "Fashion-MNIST file not found" in result.stderr and "Traceback" not in result.stderr
    assert (root / "data/prepared/manifest.json").read_text() == before


def test_pipeline_rejects_unknown_stage(dvc_project):
    root = dvc_project(smoke_params())
    result = run(["gmpipe", "pipeline", "no_such_stage", "--no-server"], root, check=False)
    assert result.returncode == 2 and "unknown stage(s) no_such_stage" in result.stderr


def _imports_nothing(path: Path) -> bool:
    """A package marker with only a docstring and constants: it cannot change what a stage computes."""
    tree = ast.parse(path.read_text())
    return path.name == "__init__.py" and not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))


def test_dvc_yaml_lists_the_modules_each_stage_imports():
    """Every gmpipe module a stage imports (at module level or inside a function: the code its checkpoints'
    fingerprint hashes) is a dep, by file or folder, and params are its own sections."""
    import importlib

    from gmpipe.fingerprint import code_hashes

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        sections = list(importlib.import_module(f"gmpipe.stages.{name}").SECTIONS)
        assert stage["params"] == sections, name
        deps = [d for d in stage["deps"] if not d.startswith("$")]
        assert "flows/stages.py" in deps, name
        for relative in code_hashes(f"gmpipe.stages.{name}"):
            covered = any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in deps)
            assert covered or _imports_nothing(REPO / relative), (name, relative)


@pytest.mark.slow
def test_pipeline_reports_to_the_profile_server_with_stage_runs_as_children_and_progress(prefect_api, dvc_project,
                                                                                           tmp_path):
    """A user whose active Prefect profile names a server: `gmpipe pipeline` reports there and starts none; it runs
    one `dvc repro` for both stages, and each stage's flow run is a child of the pipeline's `dvc repro STAGE` task
    run; training progress is a progress artifact and one log line per log interval, and a tqdm bar is one line,
    not one per redraw."""
    from tests.flows.runs import (
        artifacts_of,
        child_flow_runs,
        flow_name,
        flow_run_id_in,
        log_lines,
        task_run_name,
        task_runs_of,
        unconfigured_env,
    )

    steps, log_every = 12, 3
    root = dvc_project(smoke_params(
        prepare={"max_per_class": 5}, compute={"threads": 1},
        train_vae={"steps": steps, "log_every": log_every, "checkpoint_every": steps, "disc_start": 6,
                   "warmup_steps": 0, "eval_images": 16},
    ))
    home = tmp_path / "home"
    (home / ".prefect").mkdir(parents=True)
    (home / ".prefect" / "profiles.toml").write_text(
        f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{prefect_api}"\n')
    result = subprocess.run(["gmpipe", "pipeline", "prepare", "train_vae"], cwd=root, env=unconfigured_env(home),
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "starting a local server" not in output and not (root / ".prefect").exists()

    pipeline_id = flow_run_id_in(output, "pipeline")  # on the profile's server, where this test reads it back
    children = {flow_name(child): child for child in child_flow_runs(pipeline_id)}
    assert sorted(children) == ["prepare", "train_vae"]
    for stage, child in children.items():
        assert task_run_name(child.parent_task_run_id) == f"dvc repro {stage}"
        assert child.state.is_completed()

    training = children["train_vae"].id
    [progress] = artifacts_of(training, "progress")
    assert progress.data == 100.0
    progress_lines = [line for line in log_lines(training) if re.match(r"train_vae: step \d+/12 ", line)]
    assert [line.split()[2] for line in progress_lines] == [f"{n}/{steps}" for n in range(3, steps + 1, log_every)]

    relayed = log_lines(pipeline_id)
    bars = [line for line in relayed if re.search(r"\d+/12 \[", line)]  # tqdm: "6/12 [00:03<00:03, 1.6step/s]"
    assert len(bars) <= 1, bars
    assert len(relayed) < 60, "\n".join(relayed)
    assert [line for line in relayed if line.startswith("$ dvc")] == ["$ dvc repro --single-item prepare train_vae"]
    tasks = task_runs_of(pipeline_id)
    assert sorted(tasks) == ["dvc repro prepare", "dvc repro train_vae"]
    assert all(task.state.is_completed() for task in tasks.values())
    assert [line for line in result.stdout.splitlines() if line.startswith("| ")] == [
        "| stage | outcome |", "| prepare | ran |", "| train_vae | ran |"]


def test_a_failed_stage_fails_the_pipeline_and_the_stages_after_it_are_marked_not_run(prefect_api, dvc_project,
                                                                                       tmp_path):
    """prepare fails inside the pipeline's one `dvc repro prepare train_vae`: the run fails with the stage's own
    line, the prepare task run is Failed, train_vae's is Cancelled as not run, and train_vae never started."""
    from tests.flows.runs import child_flow_runs, flow_name, flow_run_id_in, task_runs_of

    (tmp_path / "empty").mkdir()
    root = dvc_project(smoke_params(data={"path": str(tmp_path / "empty")}))
    result = run(["gmpipe", "pipeline", "prepare", "train_vae"], root, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gmpipe: error: pipeline failed: stage prepare: dvc repro failed (exit ") and \
        "Fashion-MNIST file not found" in last, result.stderr[-2000:]
    pipeline_id = flow_run_id_in(result.stdout + result.stderr, "pipeline")
    tasks = task_runs_of(pipeline_id)
    assert tasks["dvc repro prepare"].state.is_failed()
    assert tasks["dvc repro train_vae"].state.is_cancelled()
    assert tasks["dvc repro train_vae"].state.message.startswith("not run: stage prepare: ")
    assert [flow_name(child) for child in child_flow_runs(pipeline_id)] == ["prepare"]
    assert not (root / "models").exists()


def test_gmpipe_stage_imports_only_what_it_needs(prefect_api, dvc_project):
    """`gmpipe stage prepare` loads neither torch nor the model libraries nor DVC nor Prefect's server side; the
    command line itself loads no Prefect at all."""
    root = dvc_project(smoke_params(prepare={"max_per_class": 2}))
    heavy = ("torch", "diffusers", "transformers", "accelerate", "dvc", "fastapi", "sqlalchemy", "uvicorn", "scipy")
    report = (f"import sys; print(sorted(m for m in {heavy!r} if m in sys.modules), "
              "sorted(m for m in ('prefect',) if m in sys.modules))")
    cli_only = run([sys.executable, "-c", f"import gmpipe.cli; {report}"], root)
    assert cli_only.stdout.split() == ["[]", "[]"]
    stage = run([sys.executable, "-c", f"from gmpipe.cli import main; assert main(['stage', 'prepare']) == 0; "
                                       f"{report}"], root)
    assert stage.stdout.strip().splitlines()[-1] == "[] ['prefect']", stage.stdout[-2000:]


def test_a_configured_api_that_does_not_answer_is_one_line(dvc_project, tmp_path):
    """The profile names a server that is not running: one line naming the API and where it was configured, no
    traceback, and no local server started in its place."""
    from tests.flows.runs import unconfigured_env

    root = dvc_project(smoke_params())
    home = tmp_path / "home"
    (home / ".prefect").mkdir(parents=True)
    (home / ".prefect" / "profiles.toml").write_text(
        'active = "local"\n\n[profiles.local]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    for command in (["gmpipe", "pipeline", "prepare"], ["gmpipe", "stage", "prepare"]):
        result = subprocess.run(command, cwd=root, env=unconfigured_env(home), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            "gmpipe: error: the Prefect API http://127.0.0.1:9/api (from the Prefect profile 'local') does not answer "
            "(ConnectError: [Errno 111] Connection refused); start that server, or choose another API"]
        assert "starting a local server" not in result.stdout and not (root / "data").exists()
