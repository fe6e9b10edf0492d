"""``train_decoder``: a small, fast decoder distilled from the autoencoder's on the cached latents, through the
shared loop (``gmpipe.vae.decoder_distillation``). Writes ``models/decoder/`` (``gmpipe.nn.small_decoder``: a
diffusers AutoencoderTiny folder plus the latent statistics it reads) and how closely and how fast it decodes the
test latents compared with the autoencoder's decoder."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from gmpipe.artifacts import atomic_dir, write_json
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.loop import resumable_keys
from gmpipe.config.train_decoder import TrainDecoderConfig
from gmpipe.data.latents import STATS, LatentStats, load_split
from gmpipe.decoder_folder import autoencoder_hash, save_small_decoder
from gmpipe.device import available_memory_bytes, transfer
from gmpipe.errors import GmpipeError
from gmpipe.eval.reconstruction import psnr
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_tree, section_settings
from gmpipe.nn.autoencoder import downsampling_factor, load_autoencoder
from gmpipe.nn.small_decoder import SmallDecoder, build_small_decoder
from gmpipe.paths import Paths
from gmpipe.train.loop import make_accelerator, seed_everything, train
from gmpipe.vae.decoder_distillation import decoded_targets, decoder_distillation_step, target_pool_bytes

SECTIONS = ("train_decoder", "compute")
# Decoding batch of the comparison on test latents (the evaluate stage's default batch).
COMPARE_BATCH = 250


def training_fingerprint(config: TrainDecoderConfig, paths: Paths) -> Fingerprint:
    """What defines the small decoder: its size and loss keys (how long only where the learning rate decays over it;
    not the comparison size), the cached latents, the autoencoder it learns from, and the code of this stage."""
    settings = section_settings("train_decoder", config, exclude=(*resumable_keys(config.loop), "eval_images"))
    return Fingerprint(settings, {paths.name(paths.latents): hash_tree(paths.latents),
                                  paths.name(paths.vae): hash_tree(paths.vae), **code_hashes(__name__)})


def run(config: TrainDecoderConfig, compute: ComputeConfig, paths: Paths) -> dict:
    split = load_split(paths.latents, "train")
    stats = LatentStats.load(paths.latents / STATS)
    vae = load_autoencoder(paths.vae)
    channels = split.mean.shape[1]
    if channels != vae.config.latent_channels or len(stats.shift) != channels:
        raise GmpipeError(f"{paths.latents}: latents with {channels} channels (statistics for {len(stats.shift)}) "
                          f"but {paths.vae} reads {vae.config.latent_channels}; rerun the 'cache_latents' stage")
    if len(split) == 0:
        raise GmpipeError(f"{paths.latents}: no training latents to learn from; rerun the 'cache_latents' stage")
    factor = downsampling_factor(vae)
    if config.target_pool:
        check_pool_fits(config.target_pool, tuple(split.mean.shape[1:]),
                        (vae.config.out_channels, *(size * factor for size in split.mean.shape[2:])),
                        copies=max(1, compute.num_processes // compute.num_machines))
    seed_everything(config.loop.seed)  # model initialisation depends on the seed, not on what ran before
    small = SmallDecoder(build_small_decoder(channels, vae.config.out_channels, factor, config.width, config.blocks,
                                             config.full_resolution_blocks), stats)
    perceptual = None
    if config.perceptual_weight > 0:
        from gmpipe.nn.features import EffNetLite0Features
        from gmpipe.vae.perceptual import PerceptualLoss

        perceptual = PerceptualLoss(EffNetLite0Features(image_size=config.perceptual_image_size,
                                                        map_blocks=config.perceptual_blocks))
    accelerator = make_accelerator(compute)
    device = accelerator.device
    vae.to(device)
    if perceptual is not None:
        perceptual.to(device)

    pool: dict[str, torch.Tensor | float] = {}
    if config.target_pool:
        def make_batch(index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
            if not pool:  # decoded at the first batch: a run resumed at its last step never needs it
                start = time.perf_counter()
                pool["z"], pool["images"] = decoded_targets(vae, split, config.target_pool, config.loop.seed,
                                                            COMPARE_BATCH, accelerator.autocast)
                pool["seconds"] = time.perf_counter() - start
                if accelerator.is_main_process:
                    tqdm.write(f"train_decoder: target pool: {config.target_pool} posterior samples decoded in "
                               f"{pool['seconds']:.1f} s")
            return transfer(pool["z"][index], device), transfer(pool["images"][index], device)
    else:
        def make_batch(index: torch.Tensor, device: torch.device) -> torch.Tensor:
            return transfer(split.sample(index), device)  # raw z (B, c, h, w), a fresh posterior sample

    reports = paths.reports / "train_decoder"
    step = decoder_distillation_step(small, vae, perceptual, config.perceptual_weight)
    items = config.target_pool or len(split)
    result = train(config.loop, [step], items, make_batch, paths.checkpoints / "train_decoder",
                   live_dir=reports / "live", ema_of="decoder" if config.loop.ema_decay > 0 else None,
                   accelerator=accelerator, description="train_decoder",
                   fingerprint=training_fingerprint(config, paths))
    if not accelerator.is_main_process:
        return {}
    final = (result.ema.module if result.ema is not None else result.modules["decoder"]).eval()

    test = load_split(paths.latents, "test").subset(config.eval_images, seed=config.loop.seed)
    comparison = compare_decoders(vae, final, test.mean, device)
    history = result.history
    metrics = {"step": result.step, "mixed_precision": accelerator.mixed_precision,
               "first_loss": history[0]["decoder/loss"] if history else None,
               "final_loss": history[-1]["decoder/loss"] if history else None,
               "parameters": sum(p.numel() for p in final.tiny.decoder.parameters()),
               "autoencoder_decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()),
               "target_pool": config.target_pool, "target_pool_seconds": pool.get("seconds"), **comparison}
    info = {"autoencoder_sha256": autoencoder_hash(paths.vae), "distilled_from": paths.name(paths.vae),
            "latent_shape": list(split.mean.shape[1:]),
            "image_shape": [vae.config.out_channels, *(size * factor for size in split.mean.shape[2:])],
            "steps": result.step, "config": config.model_dump(mode="json")}
    with atomic_dir(paths.decoder) as out:
        save_small_decoder(out, final, info, paths.latents / STATS)
    write_json(reports / "metrics.json", metrics)
    return {"read": [str(paths.latents), str(paths.vae)], "wrote": [str(paths.decoder), str(reports)],
            "steps": result.step, "resumed_from": result.resumed_from,
            "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}


def check_pool_fits(n: int, latent_shape: tuple[int, ...], image_shape: tuple[int, ...], copies: int = 1) -> None:
    """A target pool whose ``copies`` (one per process on this machine) would take more than half the memory
    available now is refused before anything runs, in one line naming the key."""
    needed = copies * target_pool_bytes(n, latent_shape, image_shape)
    available = available_memory_bytes()
    if available is not None and needed > available / 2:
        held = f" ({copies} processes, a copy each)" if copies > 1 else ""
        raise GmpipeError(f"train_decoder.target_pool: {n} decoded targets take {needed / 2**30:.1f} GiB{held}, "
                          f"more than half the {available / 2**30:.1f} GiB of memory available; lower it (0 "
                          "decodes fresh targets at every step and holds none)")


@torch.no_grad()
def compare_decoders(vae, small: SmallDecoder, z: torch.Tensor, device: torch.device) -> dict:
    """Both decoders on the raw latents z (N, c, h, w) in batches of ``COMPARE_BATCH``: the small decoder's PSNR
    and mean absolute error against the autoencoder's images (both clamped to [-1, 1]), and each one's images per
    second on this machine (wall clock, decoding only)."""
    small.to(device)
    images, seconds = {}, {}
    for name, decode in (("full", lambda batch: vae.decode(batch).sample), ("small", lambda b: small.decode(b).sample)):
        start, out = time.perf_counter(), []
        for first in range(0, len(z), COMPARE_BATCH):
            out.append(decode(z[first:first + COMPARE_BATCH].to(device)).clamp(-1, 1).cpu())
        seconds[name] = max(time.perf_counter() - start, 1e-9)
        images[name] = torch.cat(out)
    return {"test_n": len(z), "test_psnr_vs_autoencoder": psnr(images["small"], images["full"]),
            "test_l1_vs_autoencoder": float((images["small"] - images["full"]).abs().mean()),
            "decode_images_per_second": {name: len(z) / value for name, value in seconds.items()},
            "decode_batch_size": COMPARE_BATCH, "torch_threads": torch.get_num_threads()}
