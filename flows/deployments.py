"""The flows ``prefect.yaml`` deploys: apply ``params_overrides`` to ``params.yaml``, then run the pipeline flow.

Both hold the workspace lock from before the params are rewritten until the last stage is done, so a run never
sees another run's overrides. Overrides are dotted keys (``{"train_ldm.steps": 100}``); the edited file is
validated as a whole before it replaces ``params.yaml``, and a bad key fails the run with one line naming it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.states import Failed
from ruamel.yaml.comments import CommentedMap

from flows.pipeline import dvc_stage_order, pipeline, workspace_lock
from gmpipe.config import yaml_io
from gmpipe.config.params import Params, ParamsError, parse_params_text


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


def _override_then_run(stages: list[str] | None, params_overrides: dict[str, Any] | None, force: bool, root: str):
    order = dvc_stage_order(root)
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        return Failed(message=f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(order)}")
    with workspace_lock(root):
        try:
            apply_params_overrides(Path(root) / "params.yaml", params_overrides)
        except ParamsError as exc:
            return Failed(message=f"params_overrides rejected, params.yaml left as it was: {'; '.join(exc.problems)}")
        if params_overrides:
            print("params.yaml now has " + ", ".join(f"{key} = {value!r}" for key, value in params_overrides.items()))
        return pipeline(stages=stages, root=root, force=force)


@flow(name="gmpipe-pipeline", log_prints=True)
def gmpipe_pipeline(
    stages: list[str] | None = None,
    params_overrides: dict[str, Any] | None = None,
    force: bool = False,
    root: str = ".",
):
    """The pipeline (``stages``: a subset, default all, run in DVC order) after applying ``params_overrides``,
    dotted keys such as ``{"train_ldm.steps": 100}``."""
    return _override_then_run(stages, params_overrides, force, root)


@flow(name="gmpipe-stage", log_prints=True)
def gmpipe_stage(
    stage: str,
    params_overrides: dict[str, Any] | None = None,
    force: bool = False,
    root: str = ".",
):
    """One stage, ``dvc repro -s STAGE`` (``force``: even if up to date), after applying ``params_overrides``."""
    return _override_then_run([stage], params_overrides, force, root)
