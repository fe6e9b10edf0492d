"""Deployments for real: a work pool from flows/work_pools/, `prefect deploy` of prefect.yaml, a process worker,
`prefect deployment run` with params_overrides; the overrides' validation and the workspace lock.

Prefect reads PREFECT_API_URL when it is first imported, so everything that imports it (flows.*) is imported
inside tests that take the ``prefect_api`` fixture.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO, run, smoke_params

POOL = "gmpipe-local"


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1", **extra)


def _processes_inside(folder: Path) -> list[str]:
    """Live processes whose working directory is ``folder`` or below it (worker, flow run, dvc, gmpipe)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if command and (cwd == str(folder) or cwd.startswith(f"{folder}/")):
            found.append(f"{proc.name}: {command}")
    return found


def _wait_for_final_state(flow_run_id: str, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state and flow_run.state.is_final():
                return flow_run
            if time.monotonic() > deadline:
                return flow_run
            time.sleep(1)


def _subflow_artifacts(parent_id: str, key: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[c.id for c in children])
            )
        )
    return [artifact.data for artifact in artifacts]


def test_stage_deployment_runs_on_a_process_worker_with_overrides(prefect_api, dvc_project, tmp_path):
    root = dvc_project(smoke_params(prepare={"max_per_class": 5}))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    run(["prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite",
         "--base-job-template", "flows/work_pools/process.json"], root)
    deployed = run(["prefect", "deploy", "--name", "gmpipe-stage/local", "--no-prompt"], root)
    assert "gmpipe-stage/local" in deployed.stdout

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            ["prefect", "worker", "start", "--pool", POOL, "--name", "test-worker"],
            cwd=root, env=_env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5"),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    from flows.server import stop

    try:
        started = run(["prefect", "deployment", "run", "gmpipe-stage/local", "--param", "stage=prepare",
                       "--param", 'params_overrides={"prepare.max_per_class": 3}'], root)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
        flow_run = _wait_for_final_state(flow_run_id, timeout=120)
    finally:
        stop(worker)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{worker_log.read_text()[-4000:]}"
    with pytest.raises(ProcessLookupError):
        os.killpg(worker.pid, 0)
    assert _processes_inside(root) == []

    # The override reached params.yaml before `dvc repro`, so the stage ran with 3 images per class and split.
    assert yaml.safe_load((root / "params.yaml").read_text())["prepare"]["max_per_class"] == 3
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"]["total"] == 30
    assert "max_per_class: 3" in (root / "dvc.lock").read_text()
    assert any("| prepare | ran |" in text for text in _subflow_artifacts(flow_run_id, "pipeline"))


def test_bad_override_fails_the_run_with_one_line_and_keeps_params(prefect_api, dvc_project):
    from flows.deployments import gmpipe_stage

    root = dvc_project(smoke_params(prepare={"max_per_class": 3}))
    before = (root / "params.yaml").read_text()
    state = gmpipe_stage(stage="prepare", params_overrides={"prepare.max_per_clas": 4}, root=str(root),
                             return_state=True)
    assert state.is_failed()
    assert "prepare.max_per_clas: unknown key" in state.message and "\n" not in state.message
    assert (root / "params.yaml").read_text() == before
    assert not (root / "data" / "prepared").exists()

    state = gmpipe_stage(stage="no_such_stage", root=str(root), return_state=True)
    assert state.is_failed() and "unknown stage(s) no_such_stage" in state.message


def test_overrides_keep_comments_validate_first_and_name_the_key(prefect_api, tmp_path):
    from flows.deployments import apply_params_overrides
    from gmpipe.config.params import ParamsError, load_params

    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    original = params_file.read_text()
    for overrides, expected in [
        ({"train_ldm.stepz": 100}, "train_ldm.stepz: unknown key"),
        ({"nosuch.steps": 1}, "nosuch: unknown key (override 'nosuch.steps')"),
        ({"train_ldm.steps": 0}, "train_ldm.steps: must be >= 1 (got 0)"),
        ({"prepare.seed.x": 1}, "prepare.seed.x: prepare.seed is a value, not a section"),
        ({"prepare": {"seed": 1}}, "prepare: not a dotted key"),
    ]:
        with pytest.raises(ParamsError) as error:
            apply_params_overrides(params_file, overrides)
        assert expected in str(error.value)
        assert params_file.read_text() == original

    apply_params_overrides(params_file, {"train_ldm.steps": 100, "prepare.max_per_class": 7,
                                         "distill.methods": ["reflow"]})
    changed = [line for line in params_file.read_text().splitlines() if line not in original.splitlines()]
    assert [line.split("#")[0].strip() for line in changed] == [
        "max_per_class: 7", "steps: 100", "methods: [reflow]"]
    assert len(params_file.read_text().splitlines()) == len(original.splitlines())
    assert all("#" in line for line in changed[::2])  # the comments on those lines are kept

    apply_params_overrides(params_file, {"evaluate.fid_weights": "off"})
    params = load_params(params_file)  # a bare `off` would read as false in YAML 1.1 and fail validation
    assert (params.train_ldm.loop.steps, params.prepare.max_per_class) == (100, 7)
    assert tuple(params.distill.methods) == ("reflow",)
    assert params.evaluate.fid_weights == "off"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # no temporary file left behind


def test_work_pool_templates_render(prefect_api):
    """The Kubernetes template renders to a Job with GPUs, the workspace volume and /dev/shm, and the server
    accepts both templates."""
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / "flows/work_pools/kubernetes-gpu.json").read_text())
    properties = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    values |= {"image": "registry.example.com/gmpipe:cuda", "gpus": 4, "command": "python -m prefect.engine"}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example.com/gmpipe:cuda"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/workspace", "/dev/shm"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "gmpipe-workspace"
    assert container["env"]["DVC_NO_ANALYTICS"] == "1"
    assert template["variables"]["required"] == ["image"]

    for pool, kind, file in [("gmpipe-test-gpu", "kubernetes", "kubernetes-gpu.json"),
                             ("gmpipe-test-process", "process", "process.json")]:
        result = run(["prefect", "work-pool", "create", pool, "--type", kind, "--overwrite",
                      "--base-job-template", str(REPO / "flows/work_pools" / file)], REPO)
        assert f"Created work pool '{pool}'" in result.stdout or "Updated" in result.stdout


def test_pipeline_runs_on_one_workspace_are_serialized(prefect_api, tmp_path, caplog):
    """Two threads taking the workspace lock never overlap and the second logs that it waits; the pipeline flow
    waits (and says so in its log) while someone else holds the workspace."""
    from flows.pipeline import pipeline, workspace_lock

    intervals: list[tuple[float, float]] = []
    messages: list[str] = []

    def locked_section() -> None:
        with workspace_lock(tmp_path, log=messages.append):
            start = time.monotonic()
            with workspace_lock(tmp_path, log=messages.append):  # re-entrant in one call chain
                time.sleep(0.4)
            intervals.append((start, time.monotonic()))

    threads = [threading.Thread(target=locked_section) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    (first_start, first_end), (second_start, second_end) = sorted(intervals)
    assert second_start >= first_end
    assert len(messages) == 2 and "is in use by" in messages[0] and "waiting" in messages[0]

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {"cmd": "true"}}}))
    states = []

    def waits() -> list[logging.LogRecord]:
        return [record for record in caplog.records if "is in use by" in record.getMessage()]

    with workspace_lock(tmp_path):
        runner = threading.Thread(target=lambda: states.append(pipeline(stages=[], root=str(tmp_path),
                                                                        return_state=True)))
        runner.start()
        deadline = time.monotonic() + 60
        while not waits() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runner.is_alive()
    runner.join(timeout=60)
    assert states and states[0].is_completed(), states
    assert len(waits()) == 1 and "waiting for it to finish" in waits()[0].getMessage()
