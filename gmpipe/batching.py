"""A batch of conditions, whatever their kind: None, a tensor (B, ...), or a tuple/list/dict of tensors, batch first
(class labels (B,); caption token states (B, L, D) with their mask (B, L)). Taking rows, joining two batches and
moving one to a device are the same for every kind, so they are written once here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def take_rows(cond: Any, index: Tensor | slice) -> Any:
    """``cond[index]`` for every tensor of ``cond`` ((B,) long index or a slice); None stays None."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[index]
    if isinstance(cond, dict):
        return {key: take_rows(value, index) for key, value in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(take_rows(value, index) for value in cond)
    raise TypeError(f"conditions must be tensors or tuples/lists/dicts of tensors, got {type(cond)}")


def concat_rows(first: Any, second: Any) -> Any:
    """``first`` then ``second`` along the batch (same structure); a ``second`` tensor with batch 1 is repeated to
    ``first``'s batch (a null condition built once)."""
    if isinstance(first, Tensor):
        return torch.cat([first, second.expand_as(first) if second.shape[0] == 1 else second])
    if isinstance(first, dict):
        return {key: concat_rows(first[key], second[key]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_rows(f, s) for f, s in zip(first, second, strict=True))
    raise TypeError(f"conditions must be tensors or tuples/lists/dicts of tensors, got {type(first)}")


def to_device(cond: Any, device: torch.device | str | None,
              move: Callable[[Tensor, Any], Tensor] = Tensor.to) -> Any:
    """``cond`` with every tensor moved to ``device`` by ``move`` (e.g. ``gmpipe.device.transfer`` for training
    batches); None: left where it is."""
    if cond is None or device is None:
        return cond
    if isinstance(cond, Tensor):
        return move(cond, device)
    if isinstance(cond, dict):
        return {key: to_device(value, device, move) for key, value in cond.items()}
    return type(cond)(to_device(value, device, move) for value in cond)


def even_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``ceil(n / batch_size)`` consecutive batches covering [0, n), their sizes differing by at
    most one: 300 items at 250 are 150 + 150, not 250 + 50, whose small last batch runs a network at a fraction of
    its throughput (the demo's guided DiT: 4.5 ms an image at batch 50, 3.3-3.4 at 150-300)."""
    count = -(-n // batch_size)
    bounds = [n * i // count for i in range(count + 1)] if count else [0]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
