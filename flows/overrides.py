"""What a deployment run's ``params_overrides`` may change, and ``params.yaml`` put back as the run found it.

Whoever can start a deployment run can pass any ``params_overrides``. Most keys only change numbers and choices, but
every key that takes free text names something the worker acts on: a module to import (``evaluate.fid_module``,
``cache_latents.text_encoder: package:...``), a file or folder to read (``data.path``, ``evaluate.fid_weights``,
``train_vae.lpips_weights``, ``train_vae.lpips_backbone_weights``, a ``cache_latents.text_encoder`` folder) or a
host to connect to (``compute.main_process_ip``). Those keys, found from the params schema so that a new one is
covered the day it is added, are refused in overrides unless the deployment itself lists them in its job variable
``allowed_override_keys`` (set by whoever runs ``prefect deploy``; the job variables of a single run, which whoever
starts it may set, are not read).

A run's overrides last for that run only: :func:`params_kept` puts ``params.yaml`` back when the run ends, however it
ends. A copy of the file as it was is written before it changes, so that if the process is killed outright, the next
run that takes the workspace (:func:`restore_after_killed_run`) puts it back instead.
"""

from __future__ import annotations

import contextlib
import json
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gmpipe.artifacts import atomic_file
from gmpipe.config.base import Section
from gmpipe.config.params import Params

ALLOWED_KEYS_VARIABLE = "allowed_override_keys"
MAX_KEYS = 100
MAX_KEY_LENGTH = 200
MAX_VALUE_CHARACTERS = 10_000  # as JSON; a params value is a number, a word or a short list
KEPT_PARAMS = Path(".dvc") / "tmp" / "gmpipe-params-before-run.yaml"
PARAMS_OF_KILLED_RUN = Path(".dvc") / "tmp" / "gmpipe-params-of-killed-run.yaml"


def keys_naming_code_or_paths(model: type[Section] = Params, prefix: str = "") -> list[str]:
    """Dotted keys of every params field that takes free text (a string that is not one of a fixed set of choices):
    each names a module, a path or a host. Named as in ``params.yaml``: a training section's loop keys are its own."""
    keys = []
    for name, field in model.flat_fields().items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            keys += keys_naming_code_or_paths(field.annotation, f"{prefix}{name}.")
        elif _takes_free_text(field.annotation):
            keys.append(f"{prefix}{name}")
    return keys


def _takes_free_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return False
    if origin is typing.Annotated:
        return _takes_free_text(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        return any(_takes_free_text(argument) for argument in typing.get_args(annotation))
    return False


def override_problems(overrides: Any, allowed: frozenset[str] = frozenset()) -> list[str]:
    """What makes ``overrides`` unacceptable before the params file is even read, one line each: not a mapping of
    dotted keys, too many or too large values, or keys that name code or paths and are not in ``allowed``. The
    values themselves (unknown keys, types, ranges) are validated with the whole file afterwards."""
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        return [f"params_overrides must be a mapping of dotted keys to values (got {type(overrides).__name__})"]
    if len(overrides) > MAX_KEYS:
        return [f"params_overrides: at most {MAX_KEYS} keys (got {len(overrides)})"]
    problems, guarded = [], []
    sensitive = keys_naming_code_or_paths()
    for key, value in overrides.items():
        shown = repr(key)[:MAX_KEY_LENGTH]
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not all(key.split(".")) or "." not in key:
            problems.append(f"{shown}: not a dotted key such as 'train_ldm.steps'")
            continue
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError):
            problems.append(f"{key}: the value is not plain data (got {type(value).__name__})")
            continue
        if size > MAX_VALUE_CHARACTERS:
            problems.append(f"{key}: the value is too large ({size} characters as JSON; at most "
                            f"{MAX_VALUE_CHARACTERS})")
        touched = [s for s in sensitive if key == s or key.startswith(s + ".") or s.startswith(key + ".")]
        if any(s not in allowed for s in touched):
            guarded.append(key)
    if guarded:
        problems.append(
            f"{', '.join(guarded)}: name{'s' if len(guarded) == 1 else ''} code to import, a path to read or a host "
            f"to reach, which a run's overrides may not change; whoever deploys can allow "
            f"{'it' if len(guarded) == 1 else 'them'} with the deployment's job variable {ALLOWED_KEYS_VARIABLE} "
            "(see prefect.yaml), or change params.yaml and commit it")
    return problems


def allowed_keys_of_this_deployment() -> frozenset[str]:
    """The keys naming code or paths that the deployment of the current flow run allows in its overrides (its job
    variable ``allowed_override_keys``: a list of dotted keys, or one string of them separated by commas); none
    outside a deployment. Raises ValueError naming the variable when it lists anything else."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if not deployment.id:
        return frozenset()
    with get_client(sync_client=True) as client:
        variables = client.read_deployment(deployment.id).job_variables or {}
    value = variables.get(ALLOWED_KEYS_VARIABLE) or []
    keys = [key.strip() for key in value.split(",")] if isinstance(value, str) else value
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ValueError(f"the deployment's job variable {ALLOWED_KEYS_VARIABLE} must be a list of dotted keys "
                         f"(got {str(value)[:200]})")
    unknown = sorted(set(keys) - set(keys_naming_code_or_paths()) - {""})
    if unknown:
        raise ValueError(f"the deployment's job variable {ALLOWED_KEYS_VARIABLE} lists {', '.join(unknown)}, which "
                         f"{'is' if len(unknown) == 1 else 'are'} not among the keys it can allow: "
                         f"{', '.join(keys_naming_code_or_paths())}")
    return frozenset(key for key in keys if key)


@contextlib.contextmanager
def params_kept(root: str | Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Put ``ROOT/params.yaml`` back as it is now when the block ends, however it ends. A copy is kept in
    ``.dvc/tmp/`` meanwhile, so that a killed run's overrides are undone by the next run that takes the workspace."""
    root = Path(root)
    params_file = root / "params.yaml"
    before = params_file.read_bytes()
    with atomic_file(root / KEPT_PARAMS, "wb") as handle:
        handle.write(before)
    try:
        yield
    finally:
        if params_file.read_bytes() != before:
            with atomic_file(params_file, "wb") as handle:
                handle.write(before)
            log("params.yaml is back as it was before this run's overrides")
        (root / KEPT_PARAMS).unlink(missing_ok=True)


def restore_after_killed_run(root: str | Path, log: Callable[[str], None] = print) -> None:
    """If a run was killed while its overrides were in ``ROOT/params.yaml``, put the file back as it was before that
    run; the file as the killed run left it is kept in ``.dvc/tmp/`` (nothing is lost). Call with the workspace
    lock held."""
    root = Path(root)
    kept = root / KEPT_PARAMS
    if not kept.is_file():
        return
    params_file = root / "params.yaml"
    before = kept.read_bytes()
    left = params_file.read_bytes() if params_file.is_file() else None
    if left != before:
        if left is not None:
            with atomic_file(root / PARAMS_OF_KILLED_RUN, "wb") as handle:
                handle.write(left)
        with atomic_file(params_file, "wb") as handle:
            handle.write(before)
        log(f"params.yaml still had the overrides of a run that was killed: put back as it was before that run "
            f"(the overridden file is kept as {PARAMS_OF_KILLED_RUN})")
    kept.unlink()
