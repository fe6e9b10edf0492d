"""Shared fixtures: a Prefect server on loopback for the session, scratch DVC projects, the data fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

# `make test` runs the suite in pytest-xdist workers, one per core. Each worker, and every process it starts, gets one
# torch/OpenMP thread unless OMP_NUM_THREADS says otherwise: with torch's default (a thread per core in every
# worker) the workers' threads outnumber the cores and small kernels slow down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from gmpipe.config import yaml_io  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE_FASHION_MNIST = REPO / "tests" / "fixtures" / "fashion-mnist-mini"
BIN = Path(sys.executable).parent


def smoke_params(**overrides) -> dict:
    """configs/smoke.yaml pointed at the committed Fashion-MNIST fixture, with section overrides."""
    params = yaml_io.load((REPO / "configs" / "smoke.yaml").read_text(), "configs/smoke.yaml")
    params["data"]["path"] = str(FIXTURE_FASHION_MNIST)
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    return params


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a test marked ``slow`` (an end-to-end run of half a minute or more) first, each file's tests kept
    together in their order: `make test` hands whole files to two workers, so starting the long ones first lets the
    short ones fill the gaps and both workers finish together, instead of one running a long file at the end alone."""
    long_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in long_files)  # stable: collection order otherwise


@pytest.fixture(scope="session", autouse=True)
def content_cache(tmp_path_factory) -> Iterator[Path]:
    """The session's own content cache (gmpipe.content_cache), for it and every process it starts: a test run neither
    reads what a user's runs cached nor leaves entries in their cache."""
    root = tmp_path_factory.mktemp("gmpipe-cache")
    previous = {name: os.environ.get(name) for name in ("GMPIPE_CACHE_DIR", "GMPIPE_CACHE")}
    os.environ["GMPIPE_CACHE_DIR"] = str(root)
    os.environ.pop("GMPIPE_CACHE", None)
    yield root
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """One real Prefect server (SQLite) on 127.0.0.1 for the whole session; every flow in the tests uses it."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # no log shipping to a server the session stops
    os.environ["DVC_NO_ANALYTICS"] = "1"
    from flows.server import local_server

    with local_server(log_file=home / "server.log") as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        prefect_reads_the_environment()
        yield api_url
    os.environ.pop("PREFECT_API_URL", None)


def prefect_reads_the_environment() -> None:
    """Prefect reads its settings from the environment once, when it is first imported: a test module that imported
    it before the session's settings were set would otherwise run its flows on a temporary server of its own, in the
    default PREFECT_HOME (~/.prefect), not on the session's."""
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


def run(command: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def dvc_project(tmp_path) -> callable:
    """A scratch git + DVC repo holding this project's code, dvc.yaml and the given params (a mapping, or the text
    of a params file as it should be written)."""

    def make(params: dict | str) -> Path:
        root = tmp_path / "project"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for folder in ("gmpipe", "flows", "configs"):
            shutil.copytree(REPO / folder, root / folder, ignore=ignore)
        for file in ("dvc.yaml", ".dvcignore"):
            shutil.copy(REPO / file, root / file)
        text = params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False)
        (root / "params.yaml").write_text(text)
        (root / ".gitignore").write_text("/data/\n/models/\n/reports/\n/checkpoints/\n.prefect/\n")
        run(["git", "init", "-q"], root)
        run(["git", "config", "user.email", "ci@example.invalid"], root)
        run(["git", "config", "user.name", "ci"], root)
        run(["dvc", "init", "-q"], root)
        run(["dvc", "config", "core.analytics", "false"], root)
        # absolute, as .ci/setup.sh sets it: a relative one breaks `dvc exp run --queue` (temporary workspaces)
        run(["dvc", "config", "--local", "core.site_cache_dir", str(root / ".dvc" / "site_cache")], root)
        return root

    return make


def autocast_seen(*networks) -> list[bool]:
    """Whether bfloat16 autocast was on at each forward of ``networks`` (torch modules; forward pre-hooks, left in
    place: the returned list keeps filling)."""
    import torch

    seen: list[bool] = []
    for network in networks:
        network.register_forward_pre_hook(lambda module, args: seen.append(
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))
    return seen
