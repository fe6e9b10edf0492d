"""The flows ``prefect.yaml`` deploys: the pipeline flow with ``params_overrides`` in ``params.yaml`` for one run.

Both hold the workspace lock from before the params are rewritten until ``params.yaml`` is back as it was, so a run
never sees another run's overrides. Overrides are dotted keys (``{"train_ldm.steps": 100}``); keys that name code,
paths or hosts are refused unless the deployment allows them (:mod:`flows.overrides`), and the edited file is
validated as a whole before it replaces ``params.yaml``: a bad override fails the run with one line naming it and
nothing written. Every run leaves a record: a ``gmpipe-run`` artifact with the params it used, how it ended and
its metrics, and, when it completed in a git workspace, a DVC experiment named after the flow run.

The working directory is the project (the deployment's pull step sets it); it is not a run parameter, so a run
cannot point the worker at another folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Failed
from ruamel.yaml.comments import CommentedMap

from flows.overrides import allowed_keys_of_this_deployment, override_problems, params_kept
from flows.pipeline import DvcFailed, dvc_stage_order, pipeline, run_dvc, workspace_lock
from gmpipe.config import yaml_io
from gmpipe.config.params import Params, ParamsError, parse_params_text

RECORD_KEY = "gmpipe-run"


def apply_params_overrides(params_file: str | Path, overrides: Mapping[str, Any] | None) -> Params | None:
    """Set each dotted key of ``overrides`` in ``params_file`` (comments and layout kept) and return the
    validated params; with no overrides the file is left alone and None returned.

    The edited text is validated with :func:`parse_params` exactly as it will be read back, then written to a
    temporary file beside ``params_file`` and renamed over it, so a bad override or a crash mid-write leaves the
    old file in place. Raises :class:`ParamsError` whose problems each name the offending dotted key.
    """
    if not overrides:
        return None
    params_file = Path(params_file)
    source = f"{params_file} with params_overrides"
    document = yaml_io.load_for_update(yaml_io.read_text(params_file), str(params_file))
    document = document if document is not None else CommentedMap()
    if not isinstance(document, Mapping):
        raise ParamsError(source, ["(top level): must be a mapping of sections"])
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) < 2 or not all(parts):
            raise ParamsError(source, [f"{key}: not a dotted key such as 'train_ldm.steps'"])
        node = document
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = CommentedMap()
            node = node[part]
            if not isinstance(node, Mapping):
                raise ParamsError(source, [f"{key}: {'.'.join(parts[: depth + 1])} is a value, not a section"])
        node[parts[-1]] = yaml_io.as_written(value, source, str(key))
    text = yaml_io.dump_for_update(document)
    try:
        params = parse_params_text(text, source)
    except ParamsError as exc:
        raise ParamsError(source, [_name_override(problem, overrides) for problem in exc.problems]) from None
    _write_atomically(params_file, text)
    return params


def _name_override(problem: str, overrides: Mapping[str, Any]) -> str:
    """``nosuch: unknown key`` -> ``nosuch: unknown key (override 'nosuch.steps')``: always name the key given."""
    location = problem.split(":", 1)[0]
    given = [str(key) for key in overrides if str(key) != location and str(key).startswith(location + ".")]
    return f"{problem} (override {', '.join(map(repr, given))})" if given else problem


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, mode)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _override_then_run(stages: list[str] | None, params_overrides: dict[str, Any] | None, force: bool):
    root = Path.cwd()  # the deployment's working directory (its pull step): never a run parameter
    try:
        order = dvc_stage_order(root)
    except OSError:
        return Failed(message=f"{root / 'dvc.yaml'} not found: the deployment must run in the project's folder")
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        return Failed(message=f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(order)}")
    try:
        problems = override_problems(params_overrides, allowed_keys_of_this_deployment())
    except ValueError as exc:
        return Failed(message=str(exc))
    if problems:
        return Failed(message=f"params_overrides rejected, params.yaml left as it was: {'; '.join(problems)}")
    with workspace_lock(root), params_kept(root):
        try:
            apply_params_overrides(root / "params.yaml", params_overrides)
        except ParamsError as exc:
            return Failed(message=f"params_overrides rejected, params.yaml left as it was: {'; '.join(exc.problems)}")
        if params_overrides:
            print("params.yaml for this run has " + ", ".join(f"{k} = {v!r}" for k, v in params_overrides.items()))
        record = RunRecord(params_overrides or {}, (root / "params.yaml").read_text())
        try:
            state = pipeline(stages=stages, root=str(root), force=force, return_state=True)
            record.outcome = state.name if state.is_completed() else f"{state.name}: {state.message}"
            if state.is_completed():
                record.experiment = save_experiment(root, flow_run.name)
        finally:
            record.metrics = read_metrics(root)
            record.publish()
    return state.result() if state.is_completed() else Failed(message=state.message)


class RunRecord:
    """What a deployment run used and produced, published as a markdown artifact on its flow run (key
    ``gmpipe-run``): the overrides, ``params.yaml`` as the run used it, how it ended, the DVC experiment it was saved
    as, and every metrics file of ``dvc.yaml``."""

    def __init__(self, overrides: dict[str, Any], params_text: str):
        self.overrides = overrides
        self.params_text = params_text
        self.outcome = "Interrupted"
        self.experiment = "not saved: the run did not complete"
        self.metrics: dict[str, Any] = {}

    def markdown(self) -> str:
        rows = [f"| `{file}` | {name} | {value} |" for file, values in self.metrics.items()
                for name, value in _flatten(values)]
        lines = [f"**{self.outcome}**", "", f"- overrides: `{json.dumps(self.overrides)}`",
                 f"- DVC experiment: {self.experiment}", "", "### Metrics", ""]
        lines += (["| file | metric | value |", "|---|---|---|", *rows] if rows else ["none written yet"])
        return "\n".join(lines + ["", "### params.yaml as this run used it", "", "```yaml", self.params_text.rstrip(),
                                  "```"])

    def publish(self) -> None:
        """Create the artifact; a failure to reach the API is a printed line, never the run's failure (nor, while
        the run is being cancelled, a replacement for the cancellation)."""
        try:
            create_markdown_artifact(key=RECORD_KEY, markdown=self.markdown(),
                                     description="params, outcome and metrics of this run")
        except Exception as exc:
            print(f"the run record (artifact {RECORD_KEY}) could not be written: {type(exc).__name__}: {exc}")


def _flatten(values: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(values, Mapping):
        return [pair for key, value in values.items() for pair in _flatten(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), values)]


def read_metrics(root: Path) -> dict[str, Any]:
    """Every metrics file that ``dvc.yaml`` declares and the workspace holds, parsed (or why it could not be)."""
    metrics = {}
    for path in _metrics_files(root):
        if (root / path).is_file():
            try:
                metrics[path] = json.loads((root / path).read_text())
            except (OSError, ValueError) as exc:
                metrics[path] = {"unreadable": type(exc).__name__}
    return metrics


def _metrics_files(root: Path) -> list[str]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [entry if isinstance(entry, str) else next(iter(entry)) for stage in stages.values()
            for entry in stage.get("metrics", [])]


def save_experiment(root: Path, name: str) -> str:
    """``dvc exp save`` of the workspace under ``name`` (so that ``dvc exp show`` lists this run with its params and
    metrics), committing the stages that have run; says how it went, never raises for a DVC or git problem."""
    head = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=root, capture_output=True)
    if head.returncode != 0:
        return "not saved: the workspace is not a git repository with a commit"
    lock_file = root / "dvc.lock"
    ran = list(yaml.safe_load(lock_file.read_text()).get("stages", {})) if lock_file.is_file() else []
    metrics = [f"--include-untracked={path}" for path in _metrics_files(root) if (root / path).is_file()]
    try:
        run_dvc(["exp", "save", "--name", name, *metrics, *ran], root)
    except DvcFailed as exc:
        return f"not saved: {exc}"
    return f"`{name}` (`dvc exp show`; `dvc exp apply {name}` brings it back)"


@flow(name="gmpipe-pipeline", log_prints=True)
def gmpipe_pipeline(
    stages: list[str] | None = None,
    params_overrides: dict[str, Any] | None = None,
    force: bool = False,
):
    """The pipeline (``stages``: a subset, default all, run in DVC order) with ``params_overrides`` (dotted keys
    such as ``{"train_ldm.steps": 100}``) in ``params.yaml`` for this run only."""
    return _override_then_run(stages, params_overrides, force)


@flow(name="gmpipe-stage", log_prints=True)
def gmpipe_stage(
    stage: str,
    params_overrides: dict[str, Any] | None = None,
    force: bool = False,
):
    """One stage, ``dvc repro -s STAGE`` (``force``: even if up to date), with ``params_overrides`` for this run."""
    return _override_then_run([stage], params_overrides, force)
