"""The whole pipeline as one Prefect flow: each stage through ``dvc repro``, so DVC decides what is up to date."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact


def dvc_stage_order(root: str | Path = ".") -> list[str]:
    """Stage names in the order ``dvc.yaml`` lists them (written in dependency order)."""
    with open(Path(root) / "dvc.yaml") as handle:
        return list(yaml.safe_load(handle)["stages"])


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def repro_stage(stage: str, root: str = ".", force: bool = False) -> str:
    """``dvc repro -s STAGE``: runs the stage only when its deps, params or code changed."""
    command = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait() != 0:
        raise RuntimeError(f"dvc repro {stage} failed (exit {process.returncode}): {''.join(lines[-5:]).strip()}")
    skipped = any("didn't change, skipping" in line or "is cached - skipping" in line for line in lines)
    return "up to date" if skipped else "ran"


@flow(name="pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, root: str = ".", force: bool = False) -> dict[str, str]:
    """Run ``stages`` (default: all, in DVC order); returns what happened to each."""
    order = dvc_stage_order(root)
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    selected = [s for s in order if stages is None or s in stages]
    outcome = {stage: repro_stage(stage, root, force) for stage in selected}
    table = "\n".join(f"| {stage} | {what} |" for stage, what in outcome.items())
    create_markdown_artifact(key="pipeline", markdown=f"| stage | outcome |\n|---|---|\n{table}")
    return outcome
