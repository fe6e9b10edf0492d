"""Where a network runs: a ``compute.device`` setting (``auto``, ``cpu`` or ``cuda``) resolved against the hardware
present. Training stages go through accelerate; the stages and commands that only run networks (encoding, sampling,
evaluation) use :func:`resolve_device`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gmpipe.errors import GmpipeError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(setting: str, key: str = "compute.device") -> torch.device:
    """``auto``: CUDA when present, else the CPU. ``cuda`` without a usable CUDA device is a GmpipeError naming
    ``key`` (the setting's name where the user wrote it) and why."""
    if setting not in DEVICES:
        raise GmpipeError(f"{key}: must be one of {', '.join(DEVICES)} (got {str(setting)[:40]!r})")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise GmpipeError(f"{key}: cuda requested but {why}; use cpu or auto")
    return torch.device("cuda")


def conditions_to_device(cond: Any, device: torch.device | str | None) -> Any:
    """A condition (None, a tensor, or a tuple/list/dict of tensors) moved to ``device``."""
    if cond is None or device is None:
        return cond
    if isinstance(cond, Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {key: conditions_to_device(value, device) for key, value in cond.items()}
    return type(cond)(conditions_to_device(value, device) for value in cond)
