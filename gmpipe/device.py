"""Where a network runs: a ``compute.device`` setting (``auto``, ``cpu`` or ``cuda``) resolved against the hardware
present. Training stages go through accelerate; the stages and commands that only run networks (encoding, sampling,
evaluation) use :func:`resolve_device`."""

from __future__ import annotations

from pathlib import Path

import torch

from gmpipe.config.compute import DEVICES
from gmpipe.errors import GmpipeError
from gmpipe.procfs import kib_field


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


def transfer(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; pinned and asynchronous when that device is a GPU (training batches)."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory the kernel says a new allocation can take without swapping (``MemAvailable``), in bytes; None where
    that is not known (not Linux)."""
    kib = kib_field(meminfo, "MemAvailable")
    return None if kib is None else kib * 1024
