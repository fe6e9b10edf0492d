"""5. Orchestration: the ``prepare`` stage through ``dvc repro`` + Prefect vs the stage function called directly,
and a no-op ``dvc repro`` (target < 2 s).

A scratch git + DVC repo is built like ``tests/conftest.py::dvc_project`` (this project's code and dvc.yaml,
``configs/smoke.yaml`` pointed at the committed Fashion-MNIST fixture) and only ``prepare`` is forced
(``dvc repro --single-item --force prepare``, which calls ``gmpipe stage prepare``, a Prefect flow). Prefect runs
against a local server on 127.0.0.1 (``flows.server.local_server``; an already set ``PREFECT_API_URL`` is used
instead) and, in full runs, against Prefect's temporary per-process server. ``gmpipe stage prepare`` without DVC
and the import of the flow module split the overhead into its parts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from bench.measure import interleave, median, spread, timed
from bench.report import REPO, Section
from gmpipe.config.params import load_params
from gmpipe.paths import Paths
from gmpipe.stages import prepare

# quick: one forced run against PREFECT_API_URL's server if set, else against the temporary one; no warm-up run
SIZES = {
    "full": dict(rounds=3, both_servers=True, parts=True, warmup=True),
    "quick": dict(rounds=1, both_servers=False, parts=False, warmup=False),
}
FIXTURE = REPO / "tests" / "fixtures" / "fashion-mnist-mini"
NOOP_LIMIT = 2.0
BASE_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def _git_dvc(root: Path, *command: str) -> None:
    subprocess.run(command, cwd=root, check=True, capture_output=True, env=environment(None))


def scratch_project(parent: Path) -> Path:
    """A git + DVC repo holding this project's code and dvc.yaml, with the smoke params on the fixture."""
    root = parent / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("gmpipe", "flows", "configs"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    for file in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / file, root / file)
    params = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    params["data"]["path"] = str(FIXTURE)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/models/\n/reports/\n/checkpoints/\n.prefect/\n")
    _git_dvc(root, "git", "init", "-q")
    _git_dvc(root, "git", "config", "user.email", "bench@example.invalid")
    _git_dvc(root, "git", "config", "user.name", "bench")
    _git_dvc(root, "dvc", "init", "-q")
    _git_dvc(root, "dvc", "config", "core.analytics", "false")
    _git_dvc(root, "dvc", "config", "core.site_cache_dir", ".dvc/site_cache")
    return root


def environment(api_url: str | None) -> dict[str, str]:
    """The subprocess environment: this venv first on PATH, no analytics; PREFECT_API_URL only if given."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(BASE_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[tuple[str, float | None]]:
    """(API URL, seconds to start) of a local server on 127.0.0.1, or of the one PREFECT_API_URL names."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"], None
        return
    from flows.server import local_server

    saved = dict(os.environ)
    os.environ.update(BASE_ENV, PREFECT_HOME=str(home))
    try:
        start = time.perf_counter()
        with local_server(log_file=home / "server.log") as api_url:
            yield api_url, time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)


def command_case(command: list[str], cwd: Path, env: dict[str, str], outputs: list[str] | None = None):
    """A case running one command; it fails loudly on a non-zero exit and keeps the output if asked."""

    def case() -> float:
        start = time.perf_counter()
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr[-2000:]}")
        if outputs is not None:
            outputs.append(result.stdout + result.stderr)
        return seconds

    return case


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    use_local = s["both_servers"] or bool(os.environ.get("PREFECT_API_URL"))
    server_start = None
    with tempfile.TemporaryDirectory(prefix="gmpipe-bench-orchestration-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        project = scratch_project(tmp)
        stage_only = tmp / "stage-only"  # `gmpipe stage` writes here, so the DVC project's outputs stay as locked
        stage_only.mkdir()
        shutil.copy(project / "params.yaml", stage_only / "params.yaml")
        params = load_params(project / "params.yaml")
        servers = {}
        if use_local:
            (tmp / "prefect-home").mkdir()
            api_url, server_start = stack.enter_context(prefect_server(tmp / "prefect-home"))
            servers["local server"] = environment(api_url)
        if s["both_servers"] or not use_local:
            servers["temporary server"] = environment(None) | {"PREFECT_HOME": str(tmp / "prefect-temporary")}
        forced = ["dvc", "repro", "--single-item", "--force", "prepare"]
        any_env = next(iter(servers.values()))
        if s["warmup"]:
            command_case(forced, project, any_env)()  # the first run also writes dvc.lock
        noop_outputs: list[str] = []
        cases = {"prepare.run() called directly": timed(
            lambda: prepare.run(params.data, params.prepare, Paths(tmp / "direct")))}
        for label, env in servers.items():
            cases[f"dvc repro -f prepare + Prefect, {label}"] = command_case(forced, project, env)
        cases["no-op dvc repro prepare"] = command_case(["dvc", "repro", "prepare"], project, any_env, noop_outputs)
        if s["parts"] and use_local:
            cases["gmpipe stage prepare (no DVC), local server"] = command_case(
                ["gmpipe", "stage", "prepare", "--root", str(stage_only)], project, servers["local server"])
            cases["python -c 'import flows.stages' (imports only)"] = command_case(
                [sys.executable, "-c", "import flows.stages"], project, any_env)
        seconds = interleave(cases, s["rounds"])

    direct = median(seconds["prepare.run() called directly"])
    rows = [[name, median(t), spread(t), median(t) / direct, median(t) - direct] for name, t in seconds.items()]
    if server_start is not None:
        rows.append(["local Prefect server start (once per run)", server_start, "-", None, None])
    section = Section(
        "orchestration", "Orchestration: the prepare stage on the smoke params (fixture data)", s["rounds"],
        ["case", "seconds", "range", "x direct", "overhead s"], rows)
    for name, t in seconds.items():
        if name.startswith(("dvc repro -f", "gmpipe stage")):
            section.ratios[f"{name} / direct"] = median([a / b for a, b in zip(
                t, seconds["prepare.run() called directly"], strict=True)])
    noop = median(seconds["no-op dvc repro prepare"])
    skipped = all("didn't change, skipping" in out for out in noop_outputs)
    section.target(f"no-op dvc repro < {NOOP_LIMIT:g} s", noop, noop < NOOP_LIMIT and skipped)
    if use_local:
        section.notes.append("local server: " + ("PREFECT_API_URL from the environment" if server_start is None
                                                 else "started by this benchmark on 127.0.0.1"))
    if not skipped:
        section.notes.append("the no-op dvc repro did NOT skip the stage")
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
