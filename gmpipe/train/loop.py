"""The one training loop. Every training stage injects its losses; the loop owns everything else.

A stage describes each optimisation target as a :class:`LossStep` (a module, its learning rate, and a loss
function). A GAN passes two: the generator step and the discriminator step. For every optimizer step the loop:

1. draws ``grad_accum`` micro-batches (a seeded permutation per epoch, sharded across processes, so the batch
   sequence depends only on the seed and the step: resuming replays exactly the same data);
2. for each LossStep in order, computes its loss under autocast with the other modules frozen, and back-propagates;
3. clips, steps each optimizer and LR scheduler, updates the EMA of the main module;
4. every ``log_every`` steps logs each loss term to dvclive and the progress bar (the only host syncs), and every
   ``checkpoint_every`` steps writes an atomic checkpoint (main process only). A rerun resumes from the latest one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gmpipe.config.compute import ComputeConfig
from gmpipe.config.loop import LoopConfig
from gmpipe.errors import GmpipeError
from gmpipe.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from gmpipe.train.ema import EMA
from gmpipe.train.progress import ProgressEvent, report

# loss(batch, step, context, modules) -> (loss or None to skip this step, {term: detached scalar tensor})
LossFn = Callable[[object, int, dict, dict[str, nn.Module]], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]


@dataclass
class LossStep:
    """One optimisation target: ``module`` is trained by AdamW on ``loss``; ``lr`` overrides the loop's."""

    name: str
    module: nn.Module
    loss: LossFn
    lr: float | None = None
    extra_parameters: list[nn.Parameter] = field(default_factory=list)


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
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(n_items, generator=generator)
        mask = epochs == epoch
        out[mask] = permutation[positions[mask] % n_items]
    return out


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


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host batch to the training device; pinned and asynchronous when that device is a GPU."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
    if torch.cuda.is_available():  # TF32 matmuls on Ampere and newer: fp32 range, ~10-bit mantissa, much faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cpu = compute.device == "cpu" or (compute.device == "auto" and not torch.cuda.is_available())
    if compute.device == "cuda" and not torch.cuda.is_available():
        raise GmpipeError("compute.device: cuda requested but no CUDA device is available")
    if compute.threads and cpu:
        torch.set_num_threads(compute.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: drop the precision/device state an earlier stage left in this process (accelerate keeps it
        # in a process-wide singleton and refuses a different mixed_precision otherwise).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(mixed_precision=compute.mixed_precision, cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        raise GmpipeError(
            f"compute.mixed_precision={compute.mixed_precision!r} is not available here ({exc})"
        ) from None
    if accelerator.num_processes != compute.world_size:
        raise GmpipeError(
            f"compute asks for {compute.world_size} processes but {accelerator.num_processes} started; "
            "run the stage through `gmpipe stage` (it launches accelerate with the right flags)"
        )
    return accelerator


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
) -> TrainResult:
    """Run (or resume) training to ``config.steps`` optimizer steps; return the unwrapped modules and EMA."""
    from tqdm.auto import tqdm

    accelerator = accelerator or make_accelerator()
    # Each rank draws its own noise: identical streams on every rank would shrink the effective batch.
    seed_everything(config.seed + accelerator.process_index)
    device = accelerator.device
    main = accelerator.is_main_process
    names = [s.name for s in steps]

    for s in steps:
        s.module.to(device)
        if config.gradient_checkpointing and hasattr(s.module, "enable_gradient_checkpointing"):
            s.module.enable_gradient_checkpointing()
    optimizers = {
        s.name: torch.optim.AdamW(
            [p for p in s.module.parameters() if p.requires_grad] + s.extra_parameters,
            lr=s.lr or config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay,
            fused=_fused_adam_supported(s.module, device),
        )
        for s in steps
    }
    schedulers = {n: torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(config)) for n, o in optimizers.items()}
    ema = EMA(dict((s.name, s.module) for s in steps)[ema_of], config.ema_decay, config.ema_warmup) if ema_of else None

    start_step = 0
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint, names)
        try:
            for s in steps:
                s.module.load_state_dict(state["modules"][s.name])
                optimizers[s.name].load_state_dict(state["optimizers"][s.name]["optimizer"])
                schedulers[s.name].load_state_dict(state["optimizers"][s.name]["scheduler"])
            if ema is not None and state["ema"] is not None:
                ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise GmpipeError(
                f"{checkpoint}: does not match the current model or optimizer ({str(exc).splitlines()[0]}); "
                f"delete {checkpoint_dir} to start over"
            ) from None
        torch.set_rng_state(state["rng"]["torch_rng"])
        start_step = int(state["trainer"]["step"])
        if main:
            print(f"{description}: resuming from {checkpoint} (step {start_step})", flush=True)
    resume_every_process(accelerator, start_step, checkpoint_dir, config.seed)
    if ema is not None:
        ema.module.to(device)

    wrapped = {}
    for s in steps:
        module = torch.compile(s.module) if config.compile else s.module
        wrapped[s.name], optimizers[s.name] = accelerator.prepare(module, optimizers[s.name])
    unwrapped = {s.name: s.module for s in steps}

    live = None
    if main and live_dir is not None:
        live = _metrics_logger(live_dir, resume=start_step > 0)
        live.step = start_step

    world, rank = accelerator.num_processes, accelerator.process_index
    sums: dict[str, torch.Tensor] = {}
    count = 0
    history: list[dict[str, float]] = []
    progress = tqdm(total=config.steps, initial=start_step, desc=description, disable=not main, unit="step",
                    dynamic_ncols=True, mininterval=1.0)

    def write_checkpoint(step: int) -> None:
        if main:
            save_checkpoint(
                checkpoint_dir, step, unwrapped,
                {n: {"optimizer": optimizers[n].state_dict(), "scheduler": schedulers[n].state_dict()} for n in names},
                ema.state_dict() if ema else None,
                {"world_size": world, "config": json.loads(config.model_dump_json())}, keep=config.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    check_each_step = checks_each_step(device, config)
    unchecked_nonfinite: torch.Tensor | None = None
    last_checked = start_step

    def raise_if_nonfinite(done: int) -> None:
        nonlocal unchecked_nonfinite, last_checked
        if unchecked_nonfinite is not None and bool(unchecked_nonfinite):
            raise NonFiniteLossError(
                f"{description}: non-finite loss between steps {last_checked} and {done}; stopped, the last good "
                f"checkpoint in {checkpoint_dir} is kept"
            )
        unchecked_nonfinite, last_checked = None, done

    step = start_step
    for step in range(start_step, config.steps):
        stepped = {n: False for n in names}
        for micro in range(config.grad_accum):
            index = batch_indices(n_items, config.batch_size, step, micro, config.grad_accum, config.seed, rank, world)
            batch = make_batch(index, device)
            context: dict = {}
            for s in steps:
                others = [unwrapped[n] for n in names if n != s.name]
                modules = {n: (wrapped[n] if n == s.name else unwrapped[n]) for n in names}
                last_micro = micro == config.grad_accum - 1
                sync = contextlib.nullcontext() if last_micro or world == 1 else accelerator.no_sync(wrapped[s.name])
                with _frozen(others), sync, accelerator.autocast():
                    loss, terms = s.loss(batch, step, context, modules)
                if loss is None:
                    continue
                if not check_each_step:
                    # On an accelerator a per-step check would sync the host every step: accumulate a device-side
                    # flag and check it before every log and checkpoint instead (no bad checkpoint is ever written).
                    flag = ~torch.isfinite(loss.detach())
                    unchecked_nonfinite = flag if unchecked_nonfinite is None else unchecked_nonfinite | flag
                elif not torch.isfinite(loss.detach()):
                    if config.nonfinite == "stop":
                        raise NonFiniteLossError(
                            f"{description}: non-finite {s.name} loss at step {step} ({float(loss.detach()):g}); "
                            f"stopped, the last good checkpoint in {checkpoint_dir} is kept "
                            "(set nonfinite: skip to skip such steps)"
                        )
                    optimizers[s.name].zero_grad(set_to_none=True)
                    stepped[s.name] = None
                    continue
                with sync:
                    accelerator.backward(loss / config.grad_accum)
                if stepped[s.name] is not None:
                    stepped[s.name] = True
                for key, value in terms.items():
                    key = f"{s.name}/{key}"
                    sums[key] = sums.get(key, 0.0) + value.detach().float() / config.grad_accum
        for s in steps:
            if stepped[s.name]:
                if config.clip_grad_norm:
                    trained = [p for p in s.module.parameters() if p.requires_grad] + s.extra_parameters
                    accelerator.clip_grad_norm_(trained, config.clip_grad_norm)
                optimizers[s.name].step()
                schedulers[s.name].step()
            optimizers[s.name].zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unwrapped[ema_of])
        count += 1
        progress.update(1)
        done = step + 1
        boundary = done % config.log_every == 0 or done % config.checkpoint_every == 0 or done == config.steps
        if boundary and not check_each_step:
            raise_if_nonfinite(done)
        if done % config.log_every == 0 or done == config.steps:
            means = {k: v / count for k, v in sums.items()}
            if world > 1:
                means = {k: accelerator.reduce(v.to(device), reduction="mean") for k, v in means.items()}
            record = {k: float(v) for k, v in means.items()}
            record["lr"] = schedulers[names[0]].get_last_lr()[0]
            history.append({"step": done, **record})
            if live is not None:
                for key, value in record.items():
                    live.log_metric(key, value)
                live.step = done
                live.make_summary()
            report(ProgressEvent(description, done, config.steps, record))
            short = {k.split("/")[-1]: f"{v:.4g}" for k, v in list(record.items())[:3]}
            progress.set_postfix(short, refresh=False)
            sums, count = {}, 0
        if done % config.checkpoint_every == 0 or done == config.steps:
            write_checkpoint(done)
    progress.close()
    if live is not None:
        live.end()
    return TrainResult(
        step=max(step + 1, start_step) if config.steps > start_step else start_step,
        resumed_from=start_step, modules=unwrapped, ema=ema, history=history,
    )
