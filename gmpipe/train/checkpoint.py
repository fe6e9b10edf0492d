"""Training checkpoints: written atomically, loaded without unpickling code, reused only by the run that made them.

A checkpoint is a folder ``step-{N:08d}`` holding, for each trained module, ``{name}.safetensors`` (weights) and
``{name}.optim.pt`` (optimizer and LR-scheduler state, tensors and plain numbers only, loaded with
``weights_only=True``), ``ema.safetensors``, ``rng.pt`` and ``trainer.json`` (step, the fingerprint of what produced
it, the logged history). It is written into a temporary folder that is renamed into place when complete
(``gmpipe.artifacts.atomic_dir``), so a kill leaves either the old or the new checkpoint, never a half-written one;
weights that are not finite are never written. Only the newest ``keep`` checkpoints are kept.

On resume (:func:`select_checkpoint`) the newest checkpoint that reads back intact is used if its fingerprint
matches the current run; a corrupt one is reported and set aside (``.corrupt-step-N``), and a foreign one (another
fingerprint) or one past the run's ``steps`` sends the whole folder aside to ``<folder>.stale`` with one line naming
why.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gmpipe.artifacts import atomic_dir
from gmpipe.errors import GmpipeError
from gmpipe.fingerprint import Fingerprint, describe_changes

PREFIX = "step-"
TRAINER = "trainer.json"
STALE_SUFFIX = ".stale"


class NonFiniteWeightsError(GmpipeError):
    """Weights (or their EMA) hold NaN or Inf: the checkpoint is not written."""


def checkpoint_dirs(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(directory: Path) -> Path | None:
    found = checkpoint_dirs(directory)
    return found[-1] if found else None


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a clone gives each tensor its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_checkpoint(
    directory: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer_states: dict[str, dict],
    ema_state: dict[str, torch.Tensor] | None,
    trainer_state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; refuse (NonFiniteWeightsError) if any weight is NaN or Inf."""
    states = {name: _contiguous(module.state_dict()) for name, module in modules.items()}
    if ema_state is not None:
        states["ema"] = _contiguous(ema_state)
    bad = {name: _non_finite(state) for name, state in states.items()}
    bad = {name: keys for name, keys in bad.items() if keys}
    if bad:
        previous = latest_checkpoint(directory)
        kept = f"the last good checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        where = "; ".join(f"{name}: {', '.join(keys[:3])}" for name, keys in bad.items())
        raise NonFiniteWeightsError(f"non-finite weights at step {step} ({where}); checkpoint not written, {kept}")
    final = directory / f"{PREFIX}{step:08d}"
    try:
        with atomic_dir(final) as tmp:
            for name in modules:
                save_file(states[name], tmp / f"{name}.safetensors")
                torch.save(optimizer_states[name], tmp / f"{name}.optim.pt")
            if ema_state is not None:
                save_file(states["ema"], tmp / "ema.safetensors")
            torch.save({"torch_rng": torch.get_rng_state()}, tmp / "rng.pt")
            (tmp / TRAINER).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    except (GmpipeError, OSError) as exc:
        previous = latest_checkpoint(directory)
        kept = f"the last good checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise GmpipeError(f"{final}: checkpoint could not be written ({reason}); {kept}") from None
    for old in checkpoint_dirs(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise GmpipeError(f"{file}: not a valid safetensors file ({exc})") from None


def load_pickle_free(file: Path) -> dict:
    """A torch file of tensors and plain containers only; anything that would need code to unpickle is refused."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GmpipeError(f"{file}: refused to load (only weights_only torch files are accepted: {exc})") from None


def read_trainer_state(path: Path) -> dict:
    """``trainer.json`` of one checkpoint: a mapping with an integer ``step``, or a GmpipeError naming the file."""
    file = path / TRAINER
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GmpipeError(f"{file}: unreadable checkpoint state ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise GmpipeError(f"{file}: checkpoint state without a valid 'step'")
    return state


def read_checkpoint(path: Path, names: list[str]) -> dict:
    """Everything in one checkpoint folder, as plain dicts for the loop to restore; a GmpipeError naming the file
    when any part is missing, truncated, not pickle-free or holds non-finite weights."""
    state = {
        "trainer": read_trainer_state(path),
        "modules": {name: load_tensors(path / f"{name}.safetensors") for name in names},
        "optimizers": {name: load_pickle_free(path / f"{name}.optim.pt") for name in names},
        "ema": load_tensors(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None,
        "rng": load_pickle_free(path / "rng.pt"),
    }
    for name, tensors in [*state["modules"].items(), ("ema", state["ema"] or {})]:
        bad = _non_finite(tensors)
        if bad:
            raise GmpipeError(f"{path}: non-finite weights in {name} ({', '.join(bad[:3])})")
    return state


def _set_aside(path: Path, target: Path) -> Path:
    """Move ``path`` to ``target``, replacing an older one there."""
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def select_checkpoint(directory: Path, names: list[str], fingerprint: Fingerprint | None,
                      log=print, steps: int | None = None) -> tuple[Path, dict] | None:
    """The newest intact checkpoint of this run in ``directory`` and its state, or None to start from step 0.

    Newest first: a checkpoint that does not read back (truncated, corrupt, pickled, non-finite) is reported and
    set aside as ``.corrupt-step-N`` and the previous one is tried. The first intact one is used when its stored
    fingerprint equals ``fingerprint`` (None: no check) and it has not trained beyond ``steps`` (None: no check);
    otherwise the whole folder goes to ``<folder>.stale`` and the run starts over, with one line saying why: a run
    asked for fewer steps than its checkpoint holds must not return the longer-trained model.
    Only the main process calls this.
    """
    for path in reversed(checkpoint_dirs(directory)):
        try:
            state = read_checkpoint(path, names)
        except GmpipeError as exc:
            aside = _set_aside(path, path.with_name(f".corrupt-{path.name}"))
            log(f"{exc}; skipped (moved to {aside}), trying the previous checkpoint")
            continue
        changes = [] if fingerprint is None else fingerprint.changes(
            Fingerprint.from_dict(state["trainer"].get("fingerprint")))
        step = int(state["trainer"]["step"])
        if changes:
            why = f"{describe_changes(changes)} since {path} was written"
        elif steps is not None and step > steps:
            why = f"steps is {steps}, fewer than the {step} {path} has trained"
        else:
            return path, state
        stale = _set_aside(directory, directory.with_name(directory.name + STALE_SUFFIX))
        log(f"starting over: {why}; its checkpoints were moved to {stale}")
        return None
    return None
