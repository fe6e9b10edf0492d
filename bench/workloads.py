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

from gmpipe.config.data import DataConfig
from gmpipe.config.train_ldm import TrainLDMConfig
from gmpipe.config.train_vae import TrainVAEConfig
from gmpipe.data.fashion_mnist import CLASS_NAMES
from gmpipe.data.latents import LatentSplit, LatentStats
from gmpipe.diffusion import Objective
from gmpipe.stages.train_ldm import build_denoiser, denoising_step
from gmpipe.train.ema import EMA
from gmpipe.train.loop import LossStep, train

LATENT_SHAPE = (4, 8, 8)
NUM_CLASSES = len(CLASS_NAMES)


def ldm_config(preset: str, batch_size: int) -> TrainLDMConfig:
    """train_ldm's defaults (class conditioning, checkpoint and log intervals) at this size."""
    return TrainLDMConfig(preset=preset, batch_size=batch_size)


def ldm_step(config: TrainLDMConfig) -> LossStep:
    """A fresh denoiser and train_ldm's loss on it (the generalized objective with condition dropout)."""
    denoiser = build_denoiser(config, LATENT_SHAPE, NUM_CLASSES, text_dim=None)
    return denoising_step(denoiser, Objective.from_config(config.objective_config()), config)


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
    """The demo's AutoencoderKL (``train_vae`` defaults: widths 32, 64, 64, 4 latent channels), random init."""
    from gmpipe.nn.autoencoder import build_autoencoder

    config = TrainVAEConfig()
    return build_autoencoder(DataConfig().channels, tuple(config.block_out_channels), config.latent_channels,
                             config.layers_per_block, config.norm_num_groups, config.mid_block_attention).eval()


def _steady_seconds(stamps: list[float], warmup: int) -> float:
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

    run_config = config.model_copy(update={"steps": warmup + measured + 1})
    with tempfile.TemporaryDirectory(prefix="gmpipe-bench-") as tmp:
        train(run_config, [step], n_items, stamped_batch, Path(tmp) / "checkpoints", live_dir=Path(tmp) / "live",
              ema_of=step.name, description="bench loop")
    return _steady_seconds(stamps, warmup)


def bare_seconds_per_step(config: TrainLDMConfig, step: LossStep, n_items: int, make_batch, warmup: int,
                          measured: int, clip_and_ema: bool = False) -> float:
    """Steady-state seconds per step of a plain PyTorch loop: random batch, same loss, AdamW with the same
    hyperparameters; with ``clip_and_ema`` also gradient clipping and gmpipe's EMA, as the loop does."""
    model = step.module
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                                  weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay, config.ema_warmup) if clip_and_ema else None
    stamps = []
    for index in range(warmup + measured + 1):
        stamps.append(time.perf_counter())
        batch = make_batch(torch.randint(n_items, (config.batch_size,)), "cpu")
        loss, _ = step.loss(batch, index, {}, {step.name: model})
        loss.backward()
        if ema is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
    return _steady_seconds(stamps, warmup)
