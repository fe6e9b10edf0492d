"""The one training loop. Every training stage injects its losses; the loop owns everything else.

A stage describes each optimisation target as a :class:`LossStep` (a module, its learning rate, and a loss
function). A GAN passes two: the generator step and the discriminator step. For every optimizer step the loop:

1. draws ``grad_accum`` micro-batches (a seeded permutation per epoch, sharded across processes, so the batch
   sequence depends only on the seed and the step: resuming replays exactly the same data);
2. for each LossStep in order, computes its loss under autocast with the other modules frozen, and back-propagates;
3. clips, steps each optimizer and LR scheduler, updates the EMA of the main module;
4. every ``log_every`` steps logs each loss term to dvclive and the progress bar (the only host syncs), and every
   ``checkpoint_every`` steps writes an atomic checkpoint (main process only). A rerun resumes from the latest one.

On a CPU the main process also measures, between log points, how much of its cores other processes take, and says
once when they take what its threads need (``gmpipe.train.contention``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gmpipe.config.compute import ComputeConfig
from gmpipe.config.loop import LoopConfig
from gmpipe.device import resolve_device
from gmpipe.errors import GmpipeError
from gmpipe.fingerprint import Fingerprint
from gmpipe.precision import resolve_mixed_precision
from gmpipe.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint, select_checkpoint
from gmpipe.train.contention import Contention
from gmpipe.train.ema import EMA
from gmpipe.train.progress import ProgressEvent, report
from gmpipe.train.step import LossFn, LossStep

__all__ = ["LossFn", "LossStep", "TrainResult", "make_accelerator", "seed_everything", "train"]

@dataclass
class TrainResult:
    step: int
    resumed_from: int
    modules: dict[str, nn.Module]
    ema: EMA | None
    history: list[dict[str, float]]


class NonFiniteLossError(GmpipeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_indices(n_items: int, batch_size: int, step: int, micro: int, grad_accum: int, seed: int,
                  rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices of one micro-batch on one rank, a pure function of (seed, step, micro, rank).

    The data is walked in seeded per-epoch permutations; the global batch of an optimizer step is split into
    ``grad_accum`` micro-batches, each split across ``world`` ranks.
    """
    per_micro = batch_size // grad_accum
    per_rank = max(per_micro // world, 1)
    start = (step * batch_size + micro * per_micro + rank * per_rank)
    positions = torch.arange(start, start + per_rank)
    epochs = positions // n_items
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        out[mask] = _epoch_permutation(n_items, seed, epoch)[positions[mask] % n_items]
    return out


@functools.lru_cache(maxsize=2)  # the epoch a step is in and the next one: a batch can straddle them
def _epoch_permutation(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of the items in one epoch, shared by every call for that epoch: read it, never write to it.
    Drawn once per epoch, not once per step: a permutation of ten million items takes about 0.3 s on a CPU core.
    ``train`` empties the cache when it returns (two permutations of ten million items hold 160 MB)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_items, generator=generator)


def _lr_lambda(config: LoopConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        progress = min(max(progress, 0.0), 1.0)
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _frozen(modules: list[nn.Module]):
    """Other modules take no gradient while one step's loss is computed (a GAN's D during the G step)."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module, module_flags in zip(modules, flags, strict=True):
            for param, flag in zip(module.parameters(), module_flags, strict=True):
                param.requires_grad_(flag)


def _metrics_logger(directory: Path, resume: bool):
    """dvclive writing plain metric files only: dvc.yaml declares the metrics and plots, and the stage already runs
    inside `dvc repro`, so dvclive's own DVC integration (experiments, dvc.yaml edits, a probe of the git repo that
    fails in a repository without commits) is switched off."""
    from dvclive import Live

    class PlainLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = None

    return PlainLive(str(directory), dvcyaml=False, save_dvc_exp=False, resume=resume, report=None)


def checks_each_step(device: torch.device, config: LoopConfig) -> bool:
    """Whether losses are checked for NaN/Inf every step (CPU, or when such steps are skipped) or at each
    log/checkpoint boundary (accelerators, to keep the host out of the hot loop)."""
    return device.type == "cpu" or config.nonfinite == "skip"


def _fused_adam_supported(module: nn.Module, device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters; ~3x faster optimizer step on CPU) needs float parameters
    on CPU or CUDA."""
    return device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in module.parameters())


def make_accelerator(compute: ComputeConfig | None = None):
    """An Accelerator for ``compute`` (default: one process, CUDA if present, full precision).

    Under ``accelerate launch`` the world size comes from the launcher; it must match ``compute`` (a launcher
    that silently started one process is an error, not a slow run).
    """
    from accelerate import Accelerator

    compute = compute or ComputeConfig()
    device = resolve_device(compute.device)  # a cuda setting without CUDA fails here, in one line
    cpu = device.type == "cpu"
    if not cpu:  # TF32 matmuls on Ampere and newer: fp32 range, ~10-bit mantissa, much faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif compute.threads:
        torch.set_num_threads(compute.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: drop the precision/device state an earlier stage left in this process (accelerate keeps it
        # in a process-wide singleton and refuses a different mixed_precision otherwise).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    precision = resolve_mixed_precision(compute.mixed_precision, device)
    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        raise GmpipeError(f"compute.mixed_precision={precision!r} is not available here ({exc})") from None
    if accelerator.num_processes != compute.world_size:
        raise GmpipeError(
            f"compute asks for {compute.world_size} processes but {accelerator.num_processes} started; "
            "run the stage through `gmpipe stage` (it launches accelerate with the right flags)"
        )
    return accelerator


def build_optimizers(config: LoopConfig, steps: list[LossStep], device: torch.device):
    """One AdamW (fused where supported) and one LR schedule per LossStep, keyed by the step's name."""
    optimizers = {
        s.name: torch.optim.AdamW(
            [p for p in s.module.parameters() if p.requires_grad] + s.extra_parameters,
            lr=s.lr or config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay,
            fused=_fused_adam_supported(s.module, device),
        )
        for s in steps
    }
    schedulers = {n: torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(config)) for n, o in optimizers.items()}
    return optimizers, schedulers


def state_in_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Each per-parameter state tensor of ``optimizer`` (AdamW's moments) in its parameter's memory layout.

    ``load_state_dict`` keeps the layout the checkpoint was saved in, and a run resumed across a ``channels_last``
    switch would pair NCHW moments with channels-last weights: PyTorch's fused CPU AdamW walks both in memory order,
    so every moment would update another element (one step at lr 0.1 moved a convolution's weights by up to 0.13 from
    the uninterrupted run's). The copy keeps each element where its index says."""
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def resume(checkpoint_dir: Path, steps: list[LossStep], optimizers: dict, schedulers: dict, ema: EMA | None,
           fingerprint: Fingerprint | None, accelerator, description: str,
           total_steps: int) -> tuple[int, list[dict[str, float]]]:
    """Restore the newest intact checkpoint of this run (same fingerprint, at most ``total_steps``); return (its
    step, its log history).

    The main process picks the checkpoint (setting aside corrupt and foreign ones); then every rank loads it.
    """
    names = [s.name for s in steps]
    if accelerator.is_main_process:
        select_checkpoint(checkpoint_dir, names, fingerprint, log=lambda line: print(f"{description}: {line}",
                                                                                      flush=True), steps=total_steps)
    accelerator.wait_for_everyone()
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is None:
        return 0, []
    state = read_checkpoint(checkpoint, names)
    try:
        for s in steps:
            s.module.load_state_dict(state["modules"][s.name])
            optimizers[s.name].load_state_dict(state["optimizers"][s.name]["optimizer"])
            state_in_parameter_layouts(optimizers[s.name])
            schedulers[s.name].load_state_dict(state["optimizers"][s.name]["scheduler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise GmpipeError(
            f"{checkpoint}: does not match the current model or optimizer ({str(exc).splitlines()[0]}); "
            f"delete {checkpoint_dir} to start over"
        ) from None
    torch.set_rng_state(state["rng"]["torch_rng"])
    step = state["trainer"]["step"]
    if accelerator.is_main_process:
        print(f"{description}: resuming from {checkpoint} (step {step})", flush=True)
    history = [r for r in state["trainer"].get("history", []) if isinstance(r, dict)]
    return step, history


def resume_every_process(accelerator, start_step: int, checkpoint_dir: Path, seed: int) -> None:
    """Multi-process resume: every process must resume from the same step, and each must draw its own noise.

    Processes on other machines read the checkpoints from their own disks; one that cannot see the checkpoint the
    main process resumes from would run other steps with other optimizer state (DDP copies process 0's weights
    when it wraps a module, nothing else), and the run would diverge or hang in a collective: stop all instead.
    A checkpoint holds process 0's RNG state, which every process has just restored; the others are re-seeded
    from (seed, rank, step) so that they do not repeat process 0's noise.
    """
    if accelerator.num_processes == 1:
        return
    steps = accelerator.gather(torch.tensor([start_step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        raise GmpipeError(
            f"{checkpoint_dir}: the processes would resume from different steps (process 0 from step {steps[0]}, "
            f"the others from {sorted(set(steps[1:]))}); every machine must see the same checkpoints: put "
            f"{checkpoint_dir} on storage all machines share, or copy it to each"
        )
    if start_step > 0 and accelerator.process_index > 0:
        torch.manual_seed((seed + accelerator.process_index) * 1_000_003 + start_step)


class NonFiniteGuard:
    """The one place non-finite losses are handled.

    On CPU (or with ``nonfinite: skip``) each loss is checked as it is computed: ``stop`` raises, ``skip`` drops
    that loss for the step. On accelerators a per-step check would sync the host every step, so a device-side flag
    is accumulated and :meth:`check` raises at each log or checkpoint boundary, before anything is written.
    """

    def __init__(self, config: LoopConfig, device: torch.device, description: str, checkpoint_dir: Path):
        self.each_step = checks_each_step(device, config)
        self.policy = config.nonfinite
        self.description = description
        self.checkpoint_dir = checkpoint_dir
        self.pending: torch.Tensor | None = None
        self.last_checked = 0

    def admit(self, name: str, loss: torch.Tensor, step: int) -> bool:
        """Whether ``loss`` may be back-propagated."""
        if not self.each_step:
            flag = ~torch.isfinite(loss.detach())
            self.pending = flag if self.pending is None else self.pending | flag
            return True
        if torch.isfinite(loss.detach()):
            return True
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"{self.description}: non-finite {name} loss at step {step} ({float(loss.detach()):g}); stopped, "
                f"the last good checkpoint in {self.checkpoint_dir} is kept (set nonfinite: skip to skip such steps)"
            )
        return False

    def check(self, done: int) -> None:
        if self.pending is not None and bool(self.pending):
            raise NonFiniteLossError(
                f"{self.description}: non-finite loss between steps {self.last_checked} and {done}; stopped, the "
                f"last good checkpoint in {self.checkpoint_dir} is kept"
            )
        self.pending, self.last_checked = None, done


class MetricLog:
    """Loss terms averaged over each log interval: kept as ``history`` (stored in every checkpoint), shown on the
    progress bar, reported to progress listeners, and written by dvclive (main process only).

    The dvclive folder is rewritten from the whole history at the start of every run, so its curves are complete
    after a resume, even when ``dvc repro`` removed them or the run resumed at its last step.
    """

    def __init__(self, live_dir: Path | None, history: list[dict[str, float]], main: bool, description: str):
        self.history = list(history)
        self.description = description
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.live = _metrics_logger(live_dir, resume=False) if main and live_dir is not None else None
        for record in self.history:
            self._write(record)

    def _write(self, record: dict[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = int(record["step"])
        for key, value in record.items():
            if key != "step":
                self.live.log_metric(key, value)
        self.live.make_summary()

    def add(self, name: str, terms: dict[str, torch.Tensor], grad_accum: int) -> None:
        for key, value in terms.items():
            key = f"{name}/{key}"
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float() / grad_accum

    def flush(self, done: int, total: int, lr: float, accelerator) -> dict[str, float]:
        """Close the interval ending at step ``done``; return its record."""
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        if accelerator.num_processes > 1:
            means = {k: accelerator.reduce(v.to(accelerator.device), reduction="mean") for k, v in means.items()}
        record = {"step": done, **{k: float(v) for k, v in means.items()}, "lr": lr}
        self.history.append(record)
        self._write(record)
        report(ProgressEvent(self.description, done, total, {k: v for k, v in record.items() if k != "step"}))
        self.sums, self.count = {}, 0
        return record

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


@dataclass
class Run:
    """One training run while the loop steps: its LossSteps and their optimizers and LR schedules, the modules as
    the losses call them (``wrapped``: compiled and wrapped for data parallelism) and as they are saved
    (``unwrapped``), the EMA of one of them, the metric log, the non-finite guard, and where it checkpoints."""

    config: LoopConfig
    steps: list[LossStep]
    accelerator: Any
    optimizers: dict
    schedulers: dict
    wrapped: dict[str, nn.Module]
    unwrapped: dict[str, nn.Module]
    ema: EMA | None
    ema_of: str | None
    log: MetricLog
    guard: NonFiniteGuard
    checkpoint_dir: Path
    trainer_state: dict
    start_step: int


def prepare_modules(config: LoopConfig, steps: list[LossStep], device: torch.device) -> None:
    """Every LossStep's module on the training device (channels-last when asked), with gradient checkpointing where
    asked and supported."""
    for s in steps:
        s.module.to(device)
        if config.channels_last:
            s.module.to(memory_format=torch.channels_last)
        if config.gradient_checkpointing and hasattr(s.module, "enable_gradient_checkpointing"):
            s.module.enable_gradient_checkpointing()


def wrap_modules(config: LoopConfig, steps: list[LossStep], optimizers: dict, accelerator) -> dict[str, nn.Module]:
    """Each module compiled (``compile``) and wrapped by accelerate with its optimizer; the optimizers are replaced
    by accelerate's in ``optimizers``."""
    wrapped = {}
    for s in steps:
        module = torch.compile(s.module) if config.compile else s.module
        wrapped[s.name], optimizers[s.name] = accelerator.prepare(module, optimizers[s.name])
    return wrapped


def start_run(config: LoopConfig, steps: list[LossStep], checkpoint_dir: Path, live_dir: Path | None,
              ema_of: str | None, accelerator, description: str, fingerprint: Fingerprint | None) -> Run:
    """Build the optimizers and the EMA, resume from this run's newest checkpoint, and wrap the modules."""
    device, main = accelerator.device, accelerator.is_main_process
    prepare_modules(config, steps, device)
    optimizers, schedulers = build_optimizers(config, steps, device)
    ema = EMA({s.name: s.module for s in steps}[ema_of], config.ema_decay, config.ema_warmup) if ema_of else None
    start_step, history = resume(checkpoint_dir, steps, optimizers, schedulers, ema, fingerprint, accelerator,
                                 description, config.steps)
    resume_every_process(accelerator, start_step, checkpoint_dir, config.seed)
    if ema is not None:
        ema.module.to(device)
    wrapped = wrap_modules(config, steps, optimizers, accelerator)
    guard = NonFiniteGuard(config, device, description, checkpoint_dir)
    guard.last_checked = start_step
    trainer_state = {"world_size": accelerator.num_processes, "config": config.model_dump(mode="json"),
                     "fingerprint": fingerprint.to_dict() if fingerprint is not None else None}
    return Run(config, steps, accelerator, optimizers, schedulers, wrapped, {s.name: s.module for s in steps}, ema,
               ema_of, MetricLog(live_dir, history, main, description), guard, checkpoint_dir, trainer_state,
               start_step)


def accumulate_step(run: Run, step: int, make_batch, n_items: int) -> dict[str, bool]:
    """Forward and backward every LossStep over ``grad_accum`` micro-batches; return which ones produced
    gradients (a LossStep that returned None, or whose loss the guard dropped, did not)."""
    config, accelerator = run.config, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    stepped = {s.name: False for s in run.steps}
    dropped: set[str] = set()
    for micro in range(config.grad_accum):
        index = batch_indices(n_items, config.batch_size, step, micro, config.grad_accum, config.seed, rank, world)
        batch = make_batch(index, accelerator.device)
        context: dict = {}
        sync_now = micro == config.grad_accum - 1 or world == 1
        for s in run.steps:
            others = [module for name, module in run.unwrapped.items() if name != s.name]
            modules = {**run.unwrapped, s.name: run.wrapped[s.name]}
            sync = contextlib.nullcontext() if sync_now else accelerator.no_sync(run.wrapped[s.name])
            with _frozen(others), sync, accelerator.autocast():
                loss, terms = s.loss(batch, step, context, modules)
            if loss is None:
                continue
            if not run.guard.admit(s.name, loss, step):
                dropped.add(s.name)
                continue
            with sync:
                accelerator.backward(loss / config.grad_accum)
            stepped[s.name] = True
            run.log.add(s.name, terms, config.grad_accum)
    return {name: done and name not in dropped for name, done in stepped.items()}


def apply_updates(run: Run, stepped: dict[str, bool]) -> None:
    """Clip, step the optimizers and LR schedules of the LossSteps that produced gradients; clear gradients; update
    the EMA."""
    for s in run.steps:
        if stepped[s.name]:
            if run.config.clip_grad_norm:
                trained = [p for p in s.module.parameters() if p.requires_grad] + s.extra_parameters
                run.accelerator.clip_grad_norm_(trained, run.config.clip_grad_norm)
            run.optimizers[s.name].step()
            run.schedulers[s.name].step()
        run.optimizers[s.name].zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.unwrapped[run.ema_of])


def write_checkpoint(run: Run, done: int) -> None:
    """The checkpoint of step ``done`` (main process; the others wait for it)."""
    if run.accelerator.is_main_process:
        optimizer_states = {name: {"optimizer": run.optimizers[name].state_dict(),
                                   "scheduler": run.schedulers[name].state_dict()} for name in run.unwrapped}
        save_checkpoint(run.checkpoint_dir, done, run.unwrapped, optimizer_states,
                        run.ema.state_dict() if run.ema else None, {**run.trainer_state, "history": run.log.history},
                        keep=run.config.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def end_of_step(run: Run, done: int, progress) -> None:
    """At a log or checkpoint boundary: check for non-finite losses, log the interval, write the checkpoint."""
    config = run.config
    logging = done % config.log_every == 0 or done == config.steps
    saving = done % config.checkpoint_every == 0 or done == config.steps
    if logging or saving:
        run.guard.check(done)
    if logging:
        lr = run.schedulers[run.steps[0].name].get_last_lr()[0]
        record = run.log.flush(done, config.steps, lr, run.accelerator)
        progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(record.items())[1:4]}, refresh=False)
    if saving:
        write_checkpoint(run, done)


def train(
    config: LoopConfig,
    steps: list[LossStep],
    n_items: int,
    make_batch: Callable[[torch.Tensor, torch.device], object],
    checkpoint_dir: Path,
    live_dir: Path | None = None,
    ema_of: str | None = None,
    accelerator=None,
    description: str = "train",
    fingerprint: Fingerprint | None = None,
) -> TrainResult:
    """Run (or resume) training to ``config.steps`` optimizer steps; return the unwrapped modules and EMA.

    ``fingerprint`` (the settings and input hashes that define the result) is stored in every checkpoint; a run
    resumes only from a checkpoint with the same fingerprint and starts over otherwise (see
    :func:`gmpipe.train.checkpoint.select_checkpoint`).
    """
    from tqdm.auto import tqdm

    accelerator = accelerator or make_accelerator()
    # Each rank draws its own noise: identical streams on every rank would shrink the effective batch.
    seed_everything(config.seed + accelerator.process_index)
    run = start_run(config, steps, checkpoint_dir, live_dir, ema_of, accelerator, description, fingerprint)
    progress = tqdm(total=config.steps, initial=run.start_step, desc=description, unit="step", dynamic_ncols=True,
                    disable=not accelerator.is_main_process, mininterval=1.0)
    # Other processes on the cores this run computes on: measured between log points, said once (its docstring).
    contention = Contention(torch.get_num_threads(), description, log=tqdm.write) \
        if accelerator.device.type == "cpu" and accelerator.is_main_process else None
    for step in range(run.start_step, config.steps):
        apply_updates(run, accumulate_step(run, step, make_batch, n_items))
        run.log.count += 1
        progress.update(1)
        end_of_step(run, step + 1, progress)
        if contention is not None and (step + 1) % config.log_every == 0:
            contention.check()
    progress.close()
    run.log.close()
    _epoch_permutation.cache_clear()
    for module in [*run.unwrapped.values(), *([run.ema.module] if run.ema is not None else [])]:
        module.to(memory_format=torch.contiguous_format)  # what the caller saves or evaluates: the default layout
    return TrainResult(step=config.steps, resumed_from=run.start_step, modules=run.unwrapped,
                       ema=run.ema, history=run.log.history)
