"""DVC remotes: push, a fresh clone, pull, and `dvc repro` has nothing to do; the pipeline flow pulls before and
pushes after its stages when GMPIPE_DVC_REMOTE (or a default remote) is set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run, smoke_params

# What a scratch project commits: its code (dvc.yaml's deps), the pipeline files and the DVC config.
COMMITTED = [".gitignore", ".dvcignore", ".dvc/.gitignore", ".dvc/config", "dvc.yaml", "dvc.lock", "params.yaml",
             "gmpipe", "flows", "configs"]


def _commit_and_clone(root: Path, clone: Path) -> None:
    run(["git", "add", *COMMITTED], root)
    run(["git", "commit", "-q", "-m", "prepare"], root)
    run(["git", "clone", "-q", str(root), str(clone)], root.parent)


def _cached_files(remote: Path) -> list[Path]:
    return [path for path in remote.rglob("*") if path.is_file()]


def test_push_fresh_clone_pull_then_repro_has_nothing_to_do(prefect_api, dvc_project, tmp_path):
    root = dvc_project(smoke_params(prepare={"max_per_class": 3}))
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "store", str(remote)], root)
    run(["dvc", "repro", "prepare"], root)
    _commit_and_clone(root, tmp_path / "clone")
    run(["dvc", "push"], root)
    assert _cached_files(remote)

    clone = tmp_path / "clone"
    assert not (clone / "data").exists()
    run(["dvc", "pull", "prepare"], clone)  # only prepare has run: a bare `dvc pull` fails on the others' outputs
    manifest = "data/prepared/manifest.json"
    assert (clone / manifest).read_text() == (root / manifest).read_text()
    repro = run(["dvc", "repro", "prepare"], clone)
    assert "Stage 'prepare' didn't change, skipping" in repro.stdout
    assert "Running stage" not in repro.stdout
    assert "up to date" in run(["dvc", "status", "prepare"], clone).stdout


@pytest.mark.slow
def test_pipeline_pulls_before_and_pushes_after_with_env_remote(prefect_api, dvc_project, tmp_path, monkeypatch):
    remote = tmp_path / "env-remote"
    monkeypatch.setenv("GMPIPE_DVC_REMOTE", str(remote))
    root = dvc_project(smoke_params(prepare={"max_per_class": 3}))

    first = run(["gmpipe", "pipeline", "prepare"], root)
    assert "| prepare | ran |" in first.stdout
    assert f"url = {remote}" in (root / ".dvc/config.local").read_text()  # git-ignored: nothing to commit
    assert _cached_files(remote), first.stdout + first.stderr
    assert "dvc push -r gmpipe" in first.stderr

    clone = tmp_path / "clone"
    _commit_and_clone(root, clone)
    second = run(["gmpipe", "pipeline", "prepare"], clone)
    assert "dvc pull -r gmpipe" in second.stderr
    assert "| prepare | up to date |" in second.stdout  # the pulled outputs match dvc.lock: nothing to run
    manifest = json.loads((clone / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"]["total"] == 30
