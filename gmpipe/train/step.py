"""What a training stage hands the one loop: a :class:`LossStep` per optimisation target (a GAN passes two)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# loss(batch, step, context, modules) -> (loss or None to skip this step, {term: detached scalar tensor}).
# ``context`` is shared by the LossSteps of one micro-batch (e.g. the generator's output for the discriminator);
# ``modules`` maps each LossStep's name to its module (the trained one wrapped for data parallelism).
LossFn = Callable[[object, int, dict, dict[str, nn.Module]], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]


@dataclass
class LossStep:
    """One optimisation target: ``module`` is trained by AdamW on ``loss``; ``lr`` overrides the loop's."""

    name: str
    module: nn.Module
    loss: LossFn
    lr: float | None = None
    extra_parameters: list[nn.Parameter] = field(default_factory=list)
