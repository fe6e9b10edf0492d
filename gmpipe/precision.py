"""The precision of networks that only run (encoding latents, sampling, decoding) and of the evaluate stage's judge
classifier while it trains: a ``precision`` setting of ``fp32``, ``bf16`` or ``auto`` (``gmpipe.config.base.Precision``)
becomes one autocast context. The training stages take theirs from ``compute.mixed_precision`` through accelerate.

``auto`` is bfloat16 where the hardware computes it (:func:`fast_bf16`) and float32 elsewhere: on a CPU without
bfloat16 units, autocast runs emulated kernels, measured 6-18x slower than float32 on an AVX2-only CPU
(``python -m bench.precision``; README: Precision). Like ``compute.device: auto`` it is resolved on the machine that
runs the stage, which records what it used; a ``bf16`` written out on such a machine runs as asked, with one warning
line.
"""

from __future__ import annotations

import sys

import torch

_warned: set[tuple[str, str]] = set()

HALF = (torch.bfloat16, torch.float16)


def computes_in_half(x: torch.Tensor) -> bool:
    """Whether an operation on ``x`` runs in half precision: ``x`` is bfloat16 / float16, or autocast to one of them
    is on for its device."""
    return x.dtype in HALF or _autocast_in_half(x.device.type)


def _autocast_in_half(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in HALF
    except (TypeError, AttributeError):  # torch before 2.4 (gmpipe accepts 2.2 on): the per-device functions
        if device == "cpu":
            return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() in HALF
        return device == "cuda" and torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() in HALF


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU with native bf16 (Ampere and newer), or a CPU
    with AVX512-BF16 or AMX tiles (oneDNN's bf16 kernels); anywhere else bf16 autocast is emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the keyword reports native support only
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    return False


def _warn_emulated(key: str, device: torch.device, auto: str) -> None:
    if (key, device.type) in _warned:
        return
    _warned.add((key, device.type))
    what = "this CPU has no bfloat16 units (AVX512-BF16 or AMX)" if device.type == "cpu" else \
        "this GPU has no native bfloat16"
    print(f"{key}: bf16 runs emulated here ({what}), measured 6-18x slower than float32 on an AVX2-only CPU; "
          f"set {key}: auto or {auto} in params.yaml (README: Precision)", file=sys.stderr, flush=True)


def resolve_precision(setting: str, device: torch.device | str, key: str) -> str:
    """``fp32`` or ``bf16`` for a ``precision`` setting (``auto`` resolved on ``device``); ``key`` names the setting
    in the one warning line a ``bf16`` on hardware without it prints."""
    device = torch.device(device)
    if setting == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if setting == "bf16" and not fast_bf16(device):
        _warn_emulated(key, device, "fp32")
    return setting


def resolve_mixed_precision(setting: str, device: torch.device | str) -> str:
    """accelerate's ``no``, ``bf16`` or ``fp16`` for ``compute.mixed_precision`` (``auto``: bf16 where the device
    computes it, else no)."""
    device = torch.device(device)
    if setting == "auto":
        return "bf16" if fast_bf16(device) else "no"
    if setting == "bf16" and not fast_bf16(device):
        _warn_emulated("compute.mixed_precision", device, "no")
    return setting


def bf16_autocast(device: torch.device | str, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on ``device``'s type when ``enabled`` (a ``precision: bf16`` setting), else a disabled one."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)
