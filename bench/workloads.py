"""The train_ldm workload the benchmarks share, built from gmpipe's own pieces on synthetic data.

Latents are random (speed does not depend on their values) with the demo's shape, 4x8x8 for 32 px images
through the demo autoencoder (f = 4); the denoiser is train_ldm's class-conditional DiT, the autoencoder the
demo architecture (``train_vae`` defaults), both randomly initialised.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.report import REPO
from gmpipe.conditioning import ClassLabels
from gmpipe.config.data import DataConfig
from gmpipe.config.train_ldm import TrainLDMConfig
from gmpipe.config.train_vae import TrainVAEConfig
from gmpipe.data.fashion_mnist import CLASS_NAMES
from gmpipe.data.latents import LatentSplit, LatentStats, make_batch_fn
from gmpipe.diffusion import Objective
from gmpipe.latent_diffusion import denoising_step
from gmpipe.train.ema import EMA
from gmpipe.train.loop import train
from gmpipe.train.step import LossStep

LATENT_SHAPE = (4, 8, 8)
NUM_CLASSES = len(CLASS_NAMES)
CONDITIONING = ClassLabels(CLASS_NAMES)


def params_file(root: Path | None) -> Path:
    """The params file to read a project's settings from: ROOT/params.yaml when it exists, else this checkout's
    (which says nothing about how ROOT's models were made; the sections that use it name the file in a note)."""
    own = None if root is None else root / "params.yaml"
    return own if own is not None and own.is_file() else REPO / "params.yaml"


def ldm_config(preset: str, batch_size: int) -> TrainLDMConfig:
    """train_ldm's defaults (class conditioning, checkpoint and log intervals) at this size."""
    return TrainLDMConfig(preset=preset, batch_size=batch_size)


def ldm_step(config: TrainLDMConfig) -> LossStep:
    """A fresh denoiser and train_ldm's loss on it (the generalized objective with condition dropout)."""
    denoiser = CONDITIONING.make_denoiser(LATENT_SHAPE, config.preset)
    return denoising_step(denoiser, Objective.from_config(config.objective.objective_config()), config.p_uncond)


def ldm_batches(split: LatentSplit, stats: LatentStats):
    """train_ldm's batches of ``split``: (normalized posterior sample, class labels)."""
    return make_batch_fn(split, stats, CONDITIONING.training_conditions(split, latents=None))


def synthetic_latents(n: int, seed: int = 0) -> tuple[LatentSplit, LatentStats]:
    """n cached posteriors (mean, std) of shape LATENT_SHAPE with labels, and their measured stats."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn((n, *LATENT_SHAPE), generator=generator) * 1.7
    std = torch.rand((n, *LATENT_SHAPE), generator=generator) * 0.1 + 0.05
    labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
    split = LatentSplit(mean, std, labels, torch.zeros(n, dtype=torch.long))
    return split, LatentStats.measure(mean, std, generator)


def synthetic_images(n: int, seed: int = 0) -> torch.Tensor:
    """n uint8 images (n, C, H, W) of the demo's data shape."""
    data = DataConfig()
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(256, (n, data.channels, data.image_size, data.image_size), generator=generator,
                         dtype=torch.uint8)


def demo_autoencoder():
    """An AutoencoderKL of ``train_vae``'s default shape (widths 32, 64, 64, 4 latent channels; the demo's params use
    32, 32, 64), random init."""
    from gmpipe.nn.autoencoder import build_autoencoder

    config = TrainVAEConfig()
    return build_autoencoder(DataConfig().channels, tuple(config.block_out_channels), config.latent_channels,
                             config.layers_per_block, config.norm_num_groups, config.mid_block_attention).eval()


def steady_seconds(stamps: list[float], warmup: int) -> float:
    """Median seconds per step between the starts of steps warmup .. len - 1 (each interval is one whole step).

    The median, not the mean: a burst of load from another process on a shared machine hits a few steps only.
    """
    window = stamps[warmup:]
    return statistics.median(b - a for a, b in zip(window, window[1:], strict=False))


def loop_seconds_per_step(config: TrainLDMConfig, step: LossStep, n_items: int, make_batch, warmup: int,
                          measured: int) -> float:
    """Steady-state seconds per step of ``gmpipe.train.loop.train`` (EMA on, dvclive on, as in train_ldm).

    The clock reads at each call of make_batch, i.e. at the start of every step, so set-up, the final log and
    the final checkpoint fall outside the window; the loop's own log and checkpoint intervals are the config's
    (a rare log or checkpoint step inside the window would not move the median).
    """
    stamps: list[float] = []

    def stamped_batch(index, device):
        stamps.append(time.perf_counter())
        return make_batch(index, device)

    run_config = config.loop.model_copy(update={"steps": warmup + measured + 1})
    with tempfile.TemporaryDirectory(prefix="gmpipe-bench-") as tmp:
        train(run_config, [step], n_items, stamped_batch, Path(tmp) / "checkpoints", live_dir=Path(tmp) / "live",
              ema_of=step.name, description="bench loop")
    return steady_seconds(stamps, warmup)


def bare_seconds_per_step(config: TrainLDMConfig, step: LossStep, n_items: int, make_batch, warmup: int,
                          measured: int, clip_and_ema: bool = False) -> float:
    """Steady-state seconds per step of a plain PyTorch loop: random batch, same loss, AdamW with the same
    hyperparameters and implementation (fused), the loop's memory layout (``channels_last``); with
    ``clip_and_ema`` also gradient clipping and gmpipe's EMA, as the loop does."""
    model = step.module
    loop = config.loop
    if loop.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop.lr, betas=(loop.beta1, loop.beta2),
                                  weight_decay=loop.weight_decay, fused=True)
    ema = EMA(model, loop.ema_decay, loop.ema_warmup) if clip_and_ema else None
    stamps = []
    for index in range(warmup + measured + 1):
        stamps.append(time.perf_counter())
        batch = make_batch(torch.randint(n_items, (loop.batch_size,)), "cpu")
        loss, _ = step.loss(batch, index, {}, {step.name: model})
        loss.backward()
        if ema is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
    return steady_seconds(stamps, warmup)
