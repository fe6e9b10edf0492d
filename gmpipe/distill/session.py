"""What every distillation method answers (:class:`DistillMethod`), what it gets (:class:`DistillSession`: the
frozen teacher, the training batches, the shared loop) and what it returns (:class:`Student`).

The distill stage runs one loop: for each configured method, ``DISTILL_METHODS.lookup(name)().distill(session)``.
A method trains its students through ``session.train``, which runs the one training loop with the student's EMA,
its own checkpoint folder under ``checkpoints/distill/`` and its fingerprint (the settings every student shares,
the method's own keys, and the method's code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from gmpipe.config.distill import DistillConfig
from gmpipe.config.loop import resumable_keys
from gmpipe.diffusion import Objective
from gmpipe.fingerprint import Fingerprint, code_hashes
from gmpipe.latent_diffusion import WEIGHTS, LatentDiffusion
from gmpipe.nn.denoiser import Denoiser
from gmpipe.registry import DISTILL_METHODS
from gmpipe.train.loop import train
from gmpipe.train.step import LossFn, LossStep

MakeBatch = Callable[[torch.Tensor, torch.device | str], Any]  # (index (B,), device) -> batch


@dataclass
class Student:
    """A trained student: ``name`` is its folder under ``models/student``; ``steps`` the step counts it is meant
    for (the first is its default); ``sampler`` and ``objective`` say how it is sampled."""

    name: str
    model: Denoiser
    method: str
    steps: list[int]
    sampler: str
    objective: Objective
    train_steps: int
    final_loss: float | None


class DistillMethod:
    """A distillation method: ``distill(session)`` trains its students. ``keys`` are the ``distill.*`` params that
    define its students (in their fingerprints), ``sampling_keys`` those that only say how they sample."""

    keys: ClassVar[tuple[str, ...]] = ()
    sampling_keys: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return DISTILL_METHODS.name_of(self)

    def distill(self, session: DistillSession) -> list[Student]:
        raise NotImplementedError


@dataclass
class DistillSession:
    """The teacher and the data every method distills from.

    ``teacher``: the trained model (its denoiser frozen, in eval mode, on the accelerator's device); ``w``: the
    guidance weight folded into every student (0 for an unconditional teacher); ``make_batch``: index -> (x (B, c,
    h, w) normalized latents, cond) on a device, ``conditions``: index -> cond alone (CPU); ``base``: the
    fingerprint every student shares.
    """

    config: DistillConfig
    teacher: LatentDiffusion
    teacher_folder: Path
    w: float
    make_batch: MakeBatch
    conditions: Callable[[torch.Tensor], Any]
    n_items: int
    checkpoints: Path
    base: Fingerprint
    accelerator: Any

    @property
    def objective(self) -> Objective:
        return self.teacher.objective

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.teacher.latent_shape

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The teacher's prediction (the denoiser_fn of gmpipe.distill.teacher)."""
        return self.teacher.denoiser(x_t, t, cond)

    def null(self, batch_size: int, cond: Any) -> Any:
        """The teacher's null condition for a batch shaped like ``cond``."""
        return self.teacher.denoiser.null_condition(batch_size, like=cond)

    def fresh_student(self) -> Denoiser:
        """A copy of the teacher's weights, in training mode: where every student starts."""
        return Denoiser.from_pretrained(self.teacher_folder / WEIGHTS).train()

    def fingerprint(self, method: DistillMethod, **extra: object) -> Fingerprint:
        """The base fingerprint plus the method's keys, its own loop keys (``method_loop``, those a checkpoint may
        not differ in), its code, and ``extra`` settings (e.g. a round)."""
        keys = {f"distill.{key}": getattr(self.config, key) for key in method.keys}
        resumable = resumable_keys(self.config.loop_for(method.name))
        keys |= {f"distill.method_loop.{method.name}.{key}": value
                 for key, value in self.config.method_changes(method.name).items() if key not in resumable}
        return self.base.with_settings(**keys, **extra).with_inputs(**code_hashes(type(method).__module__))

    def train(self, method: DistillMethod, student: Denoiser, loss: LossFn, checkpoint: str, description: str,
              fingerprint: Fingerprint, make_batch: MakeBatch | None = None,
              n_items: int | None = None) -> tuple[Denoiser, int, float | None]:
        """Train ``student`` on ``loss`` through the shared loop, with ``method``'s loop (the section's and its
        ``method_loop`` keys; checkpoints in ``checkpoints/<checkpoint>``); return its EMA weights (CPU, eval mode),
        the steps trained and the final logged loss."""
        folder = self.checkpoints / checkpoint
        result = train(self.config.loop_for(method.name), [LossStep("student", student, loss)], n_items or self.n_items,
                       make_batch or self.make_batch, folder, live_dir=folder / "live", ema_of="student",
                       accelerator=self.accelerator, description=description, fingerprint=fingerprint)
        final_loss = result.history[-1].get("student/loss") if result.history else None
        return result.ema.module.to("cpu").eval(), result.step, final_loss
