"""``train_gan``: a class-conditional GAN in the autoencoder's latent space, both players through the shared loop (EMA
of the generator). Writes ``models/gan/`` (the layout of :mod:`gmpipe.gan.family`, plus the raw generator and the
discriminator), a sample grid, a slerp interpolation grid, the perceptual path length along such paths and loss
curves."""

from __future__ import annotations

import json

import torch

from gmpipe.artifacts import atomic_dir, read_json, write_json
from gmpipe.conditioning import Conditioning
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.loop import resumable_keys
from gmpipe.config.train_gan import TrainGANConfig
from gmpipe.data.latents import STATS, LatentStats, load_split, make_batch_fn
from gmpipe.data.prepared import MANIFEST, load_manifest
from gmpipe.eval.grids import save_grid
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_tree, section_settings
from gmpipe.gan.family import LatentGAN, classes_of
from gmpipe.gan.interpolation import interpolation_latents
from gmpipe.gan.loop_losses import DISCRIMINATOR, GENERATOR, gan_loss_steps
from gmpipe.gan.networks import build_networks
from gmpipe.gan.path_length import path_endpoints, perceptual_path_length
from gmpipe.generator import load_generator
from gmpipe.nn.features import EffNetLite0Features
from gmpipe.paths import Paths
from gmpipe.pixels import signed_to_uint8
from gmpipe.seeds import seed_block
from gmpipe.train.loop import make_accelerator, seed_everything, train
from gmpipe.vae.perceptual import PerceptualLoss

SECTIONS = ("train_gan", "compute")

# Keys used only after training: the stored truncation, the grids and the path-length measurement.
AFTER_TRAINING_KEYS = ("truncation", "grid_per_class", "interpolation_steps", "ppl_pairs", "ppl_image_size")
# Seed blocks of the stage's samples (gmpipe.seeds.seed_block): the grid, the interpolation paths, the PPL pairs.
GRID_SEEDS, PATH_SEEDS, PPL_SEEDS = 0, 1, 2


def training_fingerprint(config: TrainGANConfig, paths: Paths) -> Fingerprint:
    """What defines the trained GAN: networks, game and loop keys, the cached latents, the class list, and the code
    of this stage."""
    settings = section_settings("train_gan", config, exclude=(*resumable_keys(config.loop), *AFTER_TRAINING_KEYS))
    manifest = paths.prepared / MANIFEST
    return Fingerprint(settings, {paths.name(paths.latents): hash_tree(paths.latents),
                                  paths.name(manifest): hash_tree(manifest), **code_hashes(__name__)})


def run(config: TrainGANConfig, compute: ComputeConfig, paths: Paths) -> dict:
    split = load_split(paths.latents, "train")
    stats = LatentStats.load(paths.latents / STATS)
    class_names = load_manifest(paths.prepared)["class_names"]
    conditioning = Conditioning.for_training(config.conditioning, class_names, paths.latents)
    seed_everything(config.loop.seed)  # initialisation depends on the seed, not on what ran before
    generator, discriminator = build_networks(config, tuple(split.mean.shape[1:]), classes_of(conditioning))
    accelerator = make_accelerator(compute)
    reports = paths.reports / "train_gan"
    result = train(
        config.loop, gan_loss_steps(generator, discriminator, config.loss, r1_gamma=config.r1_gamma,
                                    r1_every=config.r1_every, d_lr=config.d_lr), len(split),
        make_batch_fn(split, stats, conditioning.training_conditions(split, paths.latents)),
        paths.checkpoints / "train_gan", live_dir=reports / "live", ema_of=GENERATOR, accelerator=accelerator,
        description="train_gan", fingerprint=training_fingerprint(config, paths),
    )
    if not accelerator.is_main_process:
        return {}
    with atomic_dir(paths.gan) as out:
        gan = LatentGAN(result.ema.module.to("cpu"), stats, conditioning, {"truncation": config.truncation})
        gan.save(out, "train_gan", stats_file=paths.latents / STATS)
        result.modules[GENERATOR].to("cpu").save_pretrained(out / "generator_raw")
        result.modules[DISCRIMINATOR].to("cpu").save_pretrained(out / "discriminator")
        (out / "training.json").write_text(json.dumps(
            {"steps": result.step, "config": config.model_dump(mode="json"),
             "latent_stats": read_json(paths.latents / STATS, "cache_latents")}, indent=2))

    gan = load_generator(paths.gan, autoencoder=paths.vae, device=accelerator.device, missing_stage="train_gan")
    last = result.history[-1] if result.history else {}
    metrics = {"step": result.step, **{key: value for key, value in last.items() if "/" in key},
               **write_grids(gan, config, paths, reports), "path_length": path_length(gan, config),
               "mixed_precision": accelerator.mixed_precision}
    write_json(reports / "metrics.json", metrics)
    return {"read": str(paths.latents), "wrote": [str(paths.gan), str(reports)], "steps": result.step,
            "resumed_from": result.resumed_from, "parameters": generator.num_parameters(), **metrics}


@torch.no_grad()
def write_grids(gan: LatentGAN, config: TrainGANConfig, paths: Paths, reports) -> dict:
    """``samples.png`` (a row per class, the stored truncation) and ``interpolation.png``: per row, the decoded
    G(slerp(z0, z1; t), y) at ``interpolation_steps`` evenly spaced t from 0 to 1, class fixed along the row."""
    per_row = config.grid_per_class
    rows = gan.conditioning.grid_rows(paths.latents)
    requests = [row for row in rows for _ in range(per_row)]
    images, nfe = gan.generate(requests, seed_block(config.loop.seed, GRID_SEEDS, len(requests)))
    save_grid(images, reports / "samples.png", columns=per_row)
    z0, z1, _ = path_endpoints(seed_block(config.loop.seed, PATH_SEEDS, len(rows)), gan.generator.z_dim)
    labels = gan.conditioning.encode(rows)
    latents = interpolation_latents(gan.generator, z0, z1, labels, config.interpolation_steps)  # (P, k, c, h, w)
    path_images = signed_to_uint8(gan.decode(latents.flatten(0, 1)))
    save_grid(path_images, reports / "interpolation.png", columns=config.interpolation_steps)
    return {"nfe": nfe, "grid_truncation": config.truncation, "interpolation_paths": len(rows)}


def path_length(gan: LatentGAN, config: TrainGANConfig) -> dict:
    """Perceptual path length of the EMA generator (Karras et al. 2019, t ~ U(0, 1), eps 1e-4), the distance on
    EfficientNet-Lite0 feature maps of the decoded images; the class of pair i cycles over the classes."""
    distance = PerceptualLoss(EffNetLite0Features(image_size=config.ppl_image_size)).to(gan.device).distance
    n = config.ppl_pairs
    labels = None
    if gan.conditioning.conditional:
        labels = torch.arange(n) % len(gan.conditioning.class_names)
    measured = perceptual_path_length(gan.generator, distance, seed_block(config.loop.seed, PPL_SEEDS, n), labels,
                                      decode=lambda latents: gan.decode(latents).to(gan.device))
    return {**measured.to_dict(), "image_size": config.ppl_image_size, "distance": "EffNetLite0 feature maps"}
