"""Training checkpoints: written atomically, loaded without unpickling code.

A checkpoint is a folder ``step-{N:08d}`` holding, for each trained module, ``{name}.safetensors`` (weights) and
``{name}.optim.pt`` (optimizer and LR-scheduler state, tensors and plain numbers only, loaded with
``weights_only=True``), ``ema.safetensors``, and ``trainer.json`` (step, RNG state). It is written into a temporary
folder that is renamed into place when complete, so a kill leaves either the old or the new checkpoint, never a
half-written one. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gmpipe.errors import GmpipeError

PREFIX = "step-"


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


def save_checkpoint(
    directory: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer_states: dict[str, dict],
    ema_state: dict[str, torch.Tensor] | None,
    trainer_state: dict,
    keep: int = 2,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, module in modules.items():
            save_file(_contiguous(module.state_dict()), tmp / f"{name}.safetensors")
            torch.save(optimizer_states[name], tmp / f"{name}.optim.pt")
        if ema_state is not None:
            save_file(_contiguous(ema_state), tmp / "ema.safetensors")
        torch.save({"torch_rng": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(directory)
        kept = f"the last good checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise GmpipeError(f"{final}: checkpoint could not be written ({exc.strerror or exc}); {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def read_checkpoint(path: Path, names: list[str]) -> dict:
    """Everything in one checkpoint folder, as plain dicts for the loop to restore."""
    state = {
        "modules": {name: load_tensors(path / f"{name}.safetensors") for name in names},
        "optimizers": {name: load_pickle_free(path / f"{name}.optim.pt") for name in names},
        "ema": load_tensors(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None,
        "rng": load_pickle_free(path / "rng.pt"),
    }
    try:
        state["trainer"] = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GmpipeError(f"{path / 'trainer.json'}: unreadable checkpoint state ({exc})") from None
    return state
