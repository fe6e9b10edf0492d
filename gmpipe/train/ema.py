"""Exponential moving average of weights, with the usual decay warmup.

    theta_ema <- d_t theta_ema + (1 - d_t) theta,   d_t = min(decay, (1 + t) / (10 + t)) with warmup, else decay

The warmup keeps the average from being dominated by the random initialisation early in short runs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of ``module`` (``ema.module``) updated from the live weights after each optimizer step."""

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        live = dict(module.named_parameters())
        shadow = [param for _, param in self.module.named_parameters()]
        targets = [live[name].detach().to(param.dtype) for name, param in self.module.named_parameters()]
        torch._foreach_lerp_(shadow, targets, 1.0 - decay)
        live_buffers = dict(module.named_buffers())
        for name, buffer in self.module.named_buffers():
            buffer.copy_(live_buffers[name])
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone().contiguous() for k, v in self.module.state_dict().items()}
        state["__ema_updates__"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.updates = int(state.pop("__ema_updates__"))
        self.module.load_state_dict(state)
