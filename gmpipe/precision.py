"""The precision of networks that only run (encoding latents, sampling, decoding) and of the evaluate stage's judge
classifier while it trains: a ``precision`` setting of ``fp32`` or ``bf16`` (``gmpipe.config.base.Precision``)
becomes one autocast context. The training stages take theirs from ``compute.mixed_precision`` through accelerate."""

from __future__ import annotations

import torch


def bf16_autocast(device: torch.device | str, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on ``device``'s type when ``enabled`` (a ``precision: bf16`` setting), else a disabled one."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)
