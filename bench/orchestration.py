"""5. Orchestration: what a stage pays for running as a Prefect flow through ``dvc repro``, against calling its
function, measured side by side in one run (target: <= 1.5 s per stage; a no-op ``dvc repro`` < 2 s).

A scratch git + DVC repo is built like ``tests/conftest.py::dvc_project`` (this project's code and dvc.yaml,
``configs/smoke.yaml`` pointed at the committed Fashion-MNIST fixture), plus one stage ``prepare_copy`` that runs the
same stage into a sub-folder, so that one ``dvc repro`` of two stages shows what a stage costs inside one DVC call
(as ``gmpipe pipeline`` makes it). Nothing about Prefect is configured, as for a new user: the first ``gmpipe stage``
starts the project's shared server (timed once), every later case reuses it, and the benchmark stops it at the end.
An already set ``PREFECT_API_URL`` is used instead. Full runs also time a flow on Prefect's temporary per-process
server, what every stage waited for before the shared server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.measure import interleave, median, spread, timed
from bench.report import REPO, Section
from flows.project_server import ProjectServer
from flows.stage_client import stage_server, wait_until_ready
from gmpipe.config.params import load_params
from gmpipe.paths import Paths
from gmpipe.stages import prepare

SIZES = {
    "full": dict(rounds=5, temporary_server=True, imports=True),
    "quick": dict(rounds=1, temporary_server=False, imports=False),
}
FIXTURE = REPO / "tests" / "fixtures" / "fashion-mnist-mini"
STAGE_LIMIT = 1.5  # seconds a stage through dvc repro may cost beyond its function (issue 17)
NOOP_LIMIT = 2.0
BASE_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "OMP_NUM_THREADS": "1",
}
# Prefect settings of this process that would otherwise decide the API of the scratch project's runs.
SESSION_SETTINGS = ("PREFECT_HOME", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "PREFECT_API_URL")
DIRECT_IN_A_NEW_PROCESS = """
import sys
from pathlib import Path
from gmpipe.config.params import load_params
from gmpipe.paths import Paths
from gmpipe.stages import prepare
params = load_params("params.yaml")
prepare.run(params.data, params.prepare, Paths(Path(sys.argv[1])))
"""


def _git_dvc(root: Path, env: dict[str, str], *command: str) -> None:
    subprocess.run(command, cwd=root, check=True, capture_output=True, env=env)


def scratch_project(parent: Path, env: dict[str, str]) -> Path:
    """A git + DVC repo holding this project's code and dvc.yaml, with the smoke params on the fixture, and a second
    stage ``prepare_copy`` (the prepare stage into ``copy/``) for a two-stage ``dvc repro``."""
    root = parent / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("gmpipe", "flows", "configs"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    dvc_file = yaml.safe_load((REPO / "dvc.yaml").read_text())
    first = dvc_file["stages"]["prepare"]
    dvc_file["stages"] = {"prepare": first, "prepare_copy": dict(
        first, cmd="gmpipe stage prepare --root copy --params ../params.yaml", outs=["copy/data/prepared"])}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_file, sort_keys=False))
    params = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    params["data"]["path"] = str(FIXTURE)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "copy").mkdir()
    (root / ".gitignore").write_text("/data/\n/models/\n/reports/\n/checkpoints/\n/copy/data/\n.prefect/\n")
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.invalid"],
                    ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                    ["dvc", "config", "core.analytics", "false"],
                    ["dvc", "config", "--local", "core.site_cache_dir", str(root / ".dvc" / "site_cache")]):
        _git_dvc(root, env, *command)
    return root


SERVED = "dvc repro -f prepare, forked by gmpipe pipeline's stage server"


def environment(home: Path) -> dict[str, str]:
    """A user's environment with no Prefect API configured (scratch HOME, no profile), unless this process has
    ``PREFECT_API_URL``; this venv first on PATH; no analytics."""
    env = {k: v for k, v in os.environ.items() if k not in SESSION_SETTINGS}
    home.mkdir(parents=True, exist_ok=True)
    env.update(BASE_ENV, HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if os.environ.get("PREFECT_API_URL"):
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
    return env


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


TEMPORARY_SERVER_FLOW = """
from flows import environment
environment.configure(".")
from flows.stages import run_stage
state = run_stage("prepare", "../params.yaml", "temporary")  # the params file is relative to the root
assert state.is_completed(), state.message
"""


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gmpipe-bench-orchestration-") as tmp:
        tmp = Path(tmp)
        env = environment(tmp / "home")
        project = scratch_project(tmp, env)
        env["PREFECT_HOME"] = str(project / ".prefect")  # one private home for both stages (`--root copy` too)
        params = load_params(project / "params.yaml")
        one_off: dict[str, float] = {}
        notes: list[str] = []
        try:
            first = command_case(["gmpipe", "stage", "prepare"], project, env)()
            label = "first gmpipe stage (starts the project's Prefect server)" if "PREFECT_API_URL" not in env \
                else "first gmpipe stage (PREFECT_API_URL from the environment)"
            one_off[label] = first
            if s["temporary_server"]:
                (project / "temporary").mkdir()
                try:
                    one_off["a flow on Prefect's temporary server (each stage before)"] = command_case(
                        [sys.executable, "-c", TEMPORARY_SERVER_FLOW], project,
                        env | {"PREFECT_HOME": str(tmp / "prefect-temporary")})()
                except RuntimeError as exc:  # on a busy machine it may not start within Prefect's timeout
                    lines = str(exc).strip().splitlines()  # the error, not the server's goodbye that follows it
                    why = next((line for line in reversed(lines) if "Error" in line), lines[-1])
                    notes.append(f"Prefect's temporary server: {why[:200]}")
            command_case(["dvc", "repro", "--single-item", "--force", "prepare", "prepare_copy"], project, env)()
            noop_outputs: list[str] = []
            direct = tmp / "direct"
            cases = {
                "prepare.run() in this process": timed(lambda: prepare.run(params.data, params.prepare, Paths(direct))),
                "the same in a new python process": command_case(
                    [sys.executable, "-c", DIRECT_IN_A_NEW_PROCESS, str(tmp / "direct-process")], project, env),
                "gmpipe stage prepare": command_case(["gmpipe", "stage", "prepare"], project, env),
                "dvc repro -f prepare": command_case(["dvc", "repro", "--single-item", "--force", "prepare"], project,
                                                     env),
                "dvc repro -f prepare prepare_copy (one call)": command_case(
                    ["dvc", "repro", "--single-item", "--force", "prepare", "prepare_copy"], project, env),
                "no-op dvc repro prepare": command_case(["dvc", "repro", "prepare"], project, env, noop_outputs),
            }
            if s["imports"]:
                cases["python -c 'import flows.stages'"] = command_case(
                    [sys.executable, "-c", "import flows.stages"], project, env)
            # What `gmpipe pipeline` starts for its dvc repro, with the API it names (the project's server here).
            api = env.get("PREFECT_API_URL") or ProjectServer.running(env["PREFECT_HOME"]).api_url()
            with stage_server(project, env | {"PREFECT_API_URL": api}) as served:
                wait_until_ready(served, 300)
                cases[SERVED] = command_case(["dvc", "repro", "--single-item", "--force", "prepare"], project, served,
                                             served_outputs := [])
                seconds = interleave(cases, s["rounds"])
            if not all("stage forked by the pipeline's stage server" in out for out in served_outputs):
                notes.append("the stage server did NOT serve every stage of its case")
        finally:
            subprocess.run(["gmpipe", "server", "stop"], cwd=project, env=env, capture_output=True)

    function = seconds["prepare.run() in this process"]
    one, two = seconds["dvc repro -f prepare"], seconds["dvc repro -f prepare prepare_copy (one call)"]
    direct = median(function)
    rows = [[name, median(t), spread(t), median(t) - direct] for name, t in seconds.items()]
    rows += [[name, t, "-", None] for name, t in one_off.items()]
    section = Section("orchestration", "Orchestration: the prepare stage on the smoke params (fixture data)",
                      s["rounds"], ["case", "seconds", "range", "beyond the function, s"], rows)
    per_round = {
        "gmpipe stage": [t - f for t, f in zip(seconds["gmpipe stage prepare"], function, strict=True)],
        "dvc repro of one stage": [t - f for t, f in zip(one, function, strict=True)],
        "dvc repro of one stage, forked by the stage server": [t - f for t, f in zip(seconds[SERVED], function,
                                                                                      strict=True)],
        # the second stage of one dvc call: what each stage of `gmpipe pipeline` costs once dvc has started
        "a stage inside one dvc repro": [b - a - f for a, b, f in zip(one, two, function, strict=True)],
    }
    fresh = seconds["the same in a new python process"]
    for name, t in (("gmpipe stage", seconds["gmpipe stage prepare"]), ("dvc repro of one stage", one)):
        section.ratios[f"{name} / the function in a new process"] = median(
            [a / b for a, b in zip(t, fresh, strict=True)])
    section.ratios["dvc repro of two stages / of one (one call)"] = median([b / a for a, b in zip(one, two,
                                                                                                 strict=True)])
    for name, values in per_round.items():
        section.target(f"{name} <= function + {STAGE_LIMIT:g} s", median(values), median(values) <= STAGE_LIMIT)
    noop = median(seconds["no-op dvc repro prepare"])
    skipped = all("didn't change, skipping" in out for out in noop_outputs)
    section.target(f"no-op dvc repro < {NOOP_LIMIT:g} s", noop, noop < NOOP_LIMIT and skipped)
    section.notes += notes
    section.notes.append(f"load average before {[round(v, 2) for v in load_before]}, after "
                         f"{[round(v, 2) for v in os.getloadavg()]}")
    if not skipped:
        section.notes.append("the no-op dvc repro did NOT skip the stage")
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
