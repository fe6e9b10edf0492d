"""Deployments for real: a work pool from flows/work_pools/, `prefect deploy` of prefect.yaml, a process worker,
`prefect deployment run` with params_overrides and `prefect flow-run cancel`; params.yaml as it was after every run
(completed, failed, cancelled, killed), the run records, the overrides door (keys naming code or paths, validation)
and the workspace lock.

Prefect reads PREFECT_API_URL when it is first imported, so everything that imports it (flows.*) is imported
inside tests that take the ``prefect_api`` fixture.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, FIXTURE_FASHION_MNIST, REPO, run, smoke_params

POOL = "gmpipe-local"


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1", **extra)


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


def _commit_all(root: Path) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "project"], root)


def _run_record(flow_run_id: str) -> str:
    from tests.flows.runs import artifacts_of

    [record] = [a for a in artifacts_of(flow_run_id, "markdown") if a.key == "gmpipe-run"]
    return record.data


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_deployment_runs_on_a_process_worker_leave_params_as_they_were(prefect_api, dvc_project, tmp_path):
    """Real deployments on a real process worker: a run with overrides completes with them, is recorded (artifact
    and DVC experiment), and leaves params.yaml byte for byte as it was; a second run, cancelled while its
    training stage runs, leaves params.yaml as it was too, and no process behind."""
    from tests.flows.runs import child_flow_runs, flow_name, processes_inside

    root = dvc_project(smoke_params(prepare={"max_per_class": 5}, compute={"threads": 1}))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    _commit_all(root)
    before = (root / "params.yaml").read_bytes()
    run(["prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite",
         "--base-job-template", "flows/work_pools/process.json"], root)
    deployed = run(["prefect", "deploy", "--name", "gmpipe-stage/local", "--name", "gmpipe-pipeline/local",
                    "--no-prompt"], root)
    assert "gmpipe-stage/local" in deployed.stdout and "gmpipe-pipeline/local" in deployed.stdout
    # The project folder is the deployment's, not the run's: a run cannot name another one.
    refused = run(["prefect", "deployment", "run", "gmpipe-stage/local", "--param", "stage=prepare",
                   "--param", "root=/"], root, check=False)
    assert refused.returncode != 0 and "root" in refused.stdout + refused.stderr

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            ["prefect", "worker", "start", "--pool", POOL, "--name", "test-worker"],
            cwd=root, env=_env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5"),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    from flows.server import stop

    def started(*arguments: str) -> str:
        output = run(["prefect", "deployment", "run", *arguments], root).stdout
        return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)

    try:
        completed = _wait_for_final_state(started(
            "gmpipe-stage/local", "--param", "stage=prepare",
            "--param", 'params_overrides={"prepare.max_per_class": 3}'), timeout=120)
        assert completed.state.is_completed(), f"{completed.state}\n{worker_log.read_text()[-4000:]}"
        assert (root / "params.yaml").read_bytes() == before

        cancelled_id = started("gmpipe-pipeline/local", "--param", 'stages=["train_vae"]', "--param",
                               'params_overrides={"train_vae.steps": 100000, "train_vae.checkpoint_every": 100000}')
        _wait_until(lambda: any(flow_name(c) == "train_vae" and c.state.is_running()
                                for child in child_flow_runs(cancelled_id) for c in child_flow_runs(child.id)),
                    timeout=180, what="running train_vae stage")
        assert b"steps: 100000" in (root / "params.yaml").read_bytes()
        run(["prefect", "flow-run", "cancel", cancelled_id], root)
        cancelled = _wait_for_final_state(cancelled_id, timeout=90)
        # The worker stays; the run's own processes (its flow-run process, dvc, the stage) must all end.
        _wait_until(lambda: [p for p in processes_inside(root) if not p.startswith(f"{worker.pid}:")] == [],
                    timeout=30, what="end of the cancelled run's processes")
    finally:
        stop(worker)
    assert cancelled.state.is_cancelled(), f"{cancelled.state}\n{worker_log.read_text()[-4000:]}"
    with pytest.raises(ProcessLookupError):
        os.killpg(worker.pid, 0)
    assert processes_inside(root) == []
    assert (root / "params.yaml").read_bytes() == before
    assert not (root / ".dvc/tmp/gmpipe-params-before-run.yaml").exists()

    # The completed run used its override (3 images per class and split) and is findable with it.
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"]["total"] == 30
    assert "max_per_class: 3" in (root / "dvc.lock").read_text()
    assert any("| prepare | ran |" in text for text in _subflow_artifacts(str(completed.id), "pipeline"))
    record = _run_record(str(completed.id))
    assert record.startswith("**Completed**") and "max_per_class: 3" in record
    experiments = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    saved = {e["name"]: e for baseline in experiments for e in baseline.get("experiments") or []}
    assert completed.name in saved
    [revision] = saved[completed.name]["revs"]
    params = revision["data"]["params"]["params.yaml"]["data"]
    assert params["prepare"]["max_per_class"] == 3


# params_overrides a run may not get through, and what its one-line refusal must say.
BAD_OVERRIDES = [
    ({"evaluate.fid_module": "os"}, "evaluate.fid_module: names code to import, a path to read or a host"),
    ({"evaluate.fid_weights": "/etc/shadow"}, "evaluate.fid_weights: names code"),
    ({"cache_latents.text_encoder": "package:subprocess"}, "cache_latents.text_encoder: names code"),
    ({"data.path": "/root"}, "data.path: names code"),
    ({"train_vae.lpips_weights": "/a.pth", "train_vae.lpips_backbone_weights": "/b.pth"},
     "train_vae.lpips_weights, train_vae.lpips_backbone_weights: name code"),
    ({"compute.main_process_ip": "203.0.113.7"}, "compute.main_process_ip: names code"),
    ({"data.path.inner": "/root"}, "data.path.inner: names code"),
    ({"prepare.max_per_clas": 4}, "prepare.max_per_clas: unknown key"),
    ({"nosuch.steps": 1}, "nosuch: unknown key (override 'nosuch.steps')"),
    ({"prepare.max_per_class": "4"}, "prepare.max_per_class: must be an integer"),
    ({"prepare.max_per_class": 0}, "prepare.max_per_class: must be >= 1"),
    ({"prepare.val_fraction": [0.1]}, "prepare.val_fraction: must be a number"),
    ({"prepare": {"seed": 1}}, "'prepare': not a dotted key"),
    ({"prepare.": 1}, "'prepare.': not a dotted key"),
    ({"train_ldm.steps": "9" * 20_000}, "train_ldm.steps: the value is too large (20002 characters"),
    ({f"prepare.key{i}": i for i in range(101)}, "params_overrides: at most 100 keys (got 101)"),
]


def test_bad_overrides_fail_the_run_with_one_line_and_write_nothing(prefect_api, dvc_project, monkeypatch):
    """Each bad override, through the deployment flow: a failed run whose message is one line naming the key,
    params.yaml byte for byte as before, no stage run."""
    from flows.deployments import gmpipe_pipeline, gmpipe_stage

    root = dvc_project(smoke_params(prepare={"max_per_class": 3}))
    monkeypatch.chdir(root)
    before = (root / "params.yaml").read_bytes()
    for overrides, expected in BAD_OVERRIDES:
        state = gmpipe_stage(stage="prepare", params_overrides=overrides, return_state=True)
        assert state.is_failed(), overrides
        assert expected in state.message and "\n" not in state.message and len(state.message) < 1000, state.message
        assert state.message.startswith("params_overrides rejected, params.yaml left as it was: ")
        assert (root / "params.yaml").read_bytes() == before
        assert not (root / "data" / "prepared").exists()
        assert not (root / ".dvc/tmp/gmpipe-params-before-run.yaml").exists()

    state = gmpipe_pipeline(stages=["prepare", "no_such_stage"], return_state=True)
    assert state.is_failed() and "unknown stage(s) no_such_stage" in state.message
    for flow_function in (gmpipe_pipeline, gmpipe_stage):
        assert "root" not in inspect.signature(flow_function.fn).parameters


def test_keys_naming_code_or_paths_are_every_free_text_key():
    """Found from the params schema: a key added later that takes free text is refused until someone allows it."""
    from flows.overrides import keys_naming_code_or_paths

    assert sorted(keys_naming_code_or_paths()) == [
        "cache_latents.text_encoder", "compute.main_process_ip", "data.path", "evaluate.fid_module",
        "evaluate.fid_weights", "train_vae.lpips_backbone_weights", "train_vae.lpips_weights"]


def test_a_free_text_key_of_a_part_is_named_as_params_files_write_it():
    """A loop key that took free text would be written ``section.key`` in an override, so it is guarded by that
    name (not ``section.loop.key``, which no override can match)."""
    from flows.overrides import keys_naming_code_or_paths
    from gmpipe.config.base import ComposedSection, Section

    class Part(Section):
        hook: str = "module:function"
        steps: int = 1

    class Training(ComposedSection):
        flat_parts = ("loop",)
        loop: Part = Part()
        weights: str | None = None

    class File(Section):
        train: Training = Training()

    assert sorted(keys_naming_code_or_paths(File)) == ["train.hook", "train.weights"]


def test_a_deployment_allows_named_keys_and_a_run_cannot_widen_them(prefect_api, dvc_project, tmp_path,
                                                                       monkeypatch):
    """Runs of a real deployment (created on the server, run in this process): the keys its job variable
    allowed_override_keys lists go through; a run's own job variables cannot add more; a deployment listing a key
    that is not one of them fails its runs with one line."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_sync

    from flows.deployments import gmpipe_stage

    root = dvc_project(smoke_params(prepare={"max_per_class": 2}))
    monkeypatch.chdir(root)
    before = (root / "params.yaml").read_bytes()
    elsewhere = tmp_path / "other-copy-of-the-data"
    shutil.copytree(FIXTURE_FASHION_MNIST, elsewhere)

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(gmpipe_stage)

        def deployment_run(allowed, overrides: dict, job_variables: dict | None = None):
            deployment = client.create_deployment(flow_id, f"allows-{len(allowed)}-{time.monotonic_ns()}",
                                                  entrypoint="flows/deployments.py:gmpipe_stage",
                                                  job_variables={"allowed_override_keys": allowed})
            flow_run = client.create_flow_run_from_deployment(
                deployment, parameters={"stage": "prepare", "params_overrides": overrides}, job_variables=job_variables)
            return run_flow_sync(gmpipe_stage, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")

        allowed = deployment_run(["data.path"], {"data.path": str(elsewhere)})
        assert allowed.is_completed(), allowed.message
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
        assert lock["params"]["params.yaml"]["data"]["path"] == str(elsewhere)  # prepare read the allowed folder
        assert (root / "params.yaml").read_bytes() == before

        widened = deployment_run(["data.path"], {"evaluate.fid_module": "os"},
                                 job_variables={"allowed_override_keys": ["evaluate.fid_module"]})
        assert widened.is_failed() and "evaluate.fid_module: names code" in widened.message

        misspelt = deployment_run(["data.pth"], {"data.path": str(elsewhere)})
        assert misspelt.is_failed() and "allowed_override_keys lists data.pth, which is not" in misspelt.message
    assert (root / "params.yaml").read_bytes() == before


@pytest.mark.slow
def test_a_failed_or_killed_run_leaves_params_as_they_were(prefect_api, dvc_project, monkeypatch):
    """A run whose stage fails puts params.yaml back at once; a run killed with SIGKILL cannot, and the next run
    that takes the workspace does, keeping the overridden file aside."""
    from flows.deployments import gmpipe_pipeline, gmpipe_stage
    from tests.flows.runs import artifacts_of, kill_session

    root = dvc_project(smoke_params(prepare={"max_per_class": 2}, compute={"threads": 1}))
    _commit_all(root)
    monkeypatch.chdir(root)
    before = (root / "params.yaml").read_bytes()

    failed = gmpipe_stage(stage="train_vae", params_overrides={"train_vae.steps": 7}, return_state=True)
    assert failed.is_failed() and "train_vae" in failed.message and "\n" not in failed.message
    assert (root / "params.yaml").read_bytes() == before
    [record] = [a.data for a in artifacts_of(failed.state_details.flow_run_id, "markdown") if a.key == "gmpipe-run"]
    assert record.startswith("**Failed") and "steps: 7" in record and "not saved" in record

    script = ("from flows.deployments import gmpipe_pipeline; "
              "gmpipe_pipeline(stages=['prepare', 'train_vae'], params_overrides={'train_vae.steps': 100000})")
    killed = subprocess.Popen([sys.executable, "-c", script], cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until(lambda: b"steps: 100000" in (root / "params.yaml").read_bytes(), 120, "overrides applied")
    finally:
        kill_session(killed.pid)
        killed.wait()
    assert b"steps: 100000" in (root / "params.yaml").read_bytes()

    after = gmpipe_pipeline(stages=["prepare"], return_state=True)
    assert after.is_completed(), after.message
    assert (root / "params.yaml").read_bytes() == before
    assert b"steps: 100000" in (root / ".dvc/tmp/gmpipe-params-of-killed-run.yaml").read_bytes()


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
