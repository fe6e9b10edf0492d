"""``train_ldm``: a latent denoiser trained on the generalized objective through the shared loop (EMA on).
Writes ``models/ldm/`` (the latent diffusion layout, see :mod:`gmpipe.latent_diffusion`, which is also a diffusers
pipeline folder, :mod:`gmpipe.pipelines.latent_diffusion`), a sample grid and loss curves."""

from __future__ import annotations

import json

from gmpipe.artifacts import atomic_dir, read_json, write_json
from gmpipe.conditioning import Conditioning
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.loop import resumable_keys
from gmpipe.config.train_ldm import TrainLDMConfig
from gmpipe.data.latents import STATS, LatentStats, load_split, make_batch_fn
from gmpipe.data.prepared import MANIFEST, load_manifest
from gmpipe.diffusion import Objective
from gmpipe.eval.grids import save_grid
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_tree, section_settings
from gmpipe.generator import load_generator
from gmpipe.latent_diffusion import LatentDiffusion, denoising_step
from gmpipe.paths import Paths
from gmpipe.pipelines.latent_diffusion import save_pipeline_files
from gmpipe.seeds import seed_block
from gmpipe.train.loop import make_accelerator, seed_everything, train

SECTIONS = ("train_ldm", "compute")

# Keys that only choose how the finished model samples by default (stored in sampling.json, used for its grid).
SAMPLING_KEYS = ("sampler", "sample_steps", "guidance", "grid_per_class")


def training_fingerprint(config: TrainLDMConfig, paths: Paths) -> Fingerprint:
    """What defines the trained denoiser: model, objective and loop keys, the cached latents, the class list, and
    the code of this stage."""
    settings = section_settings("train_ldm", config, exclude=(*resumable_keys(config.loop), *SAMPLING_KEYS))
    manifest = paths.prepared / MANIFEST
    return Fingerprint(settings, {paths.name(paths.latents): hash_tree(paths.latents),
                                  paths.name(manifest): hash_tree(manifest), **code_hashes(__name__)})


def run(config: TrainLDMConfig, compute: ComputeConfig, paths: Paths) -> dict:
    split = load_split(paths.latents, "train")
    stats = LatentStats.load(paths.latents / STATS)
    class_names = load_manifest(paths.prepared)["class_names"]
    conditioning = Conditioning.for_training(config.conditioning, class_names, paths.latents)
    seed_everything(config.loop.seed)  # model initialisation depends on the seed, not on what ran before
    denoiser = conditioning.make_denoiser(tuple(split.mean.shape[1:]), config.preset)
    objective = Objective.from_config(config.objective.objective_config())
    accelerator = make_accelerator(compute)
    reports = paths.reports / "train_ldm"
    result = train(
        config.loop, [denoising_step(denoiser, objective, config.p_uncond)], len(split),
        make_batch_fn(split, stats, conditioning.training_conditions(split, paths.latents)),
        paths.checkpoints / "train_ldm", live_dir=reports / "live", ema_of="denoiser", accelerator=accelerator,
        description="train_ldm", fingerprint=training_fingerprint(config, paths),
    )
    if not accelerator.is_main_process:
        return {}
    # The sampling grid uses the same resolution shift as the training time density.
    settings = {"sampler": config.sampler, "steps": config.sample_steps, "guidance": config.guidance,
                "shift": config.objective.time_shift}
    with atomic_dir(paths.ldm) as out:
        model = LatentDiffusion(result.ema.module.to("cpu"), objective, stats, conditioning, settings)
        model.save(out, "train_ldm", stats_file=paths.latents / STATS)
        save_pipeline_files(out, model, "train_ldm", autoencoder=paths.vae)
        result.modules["denoiser"].to("cpu").save_pretrained(out / "denoiser_raw")
        (out / "training.json").write_text(json.dumps(
            {"steps": result.step, "config": config.model_dump(mode="json"),
             "latent_stats": read_json(paths.latents / STATS, "cache_latents")}, indent=2))

    grid_summary = write_sample_grid(paths, config, reports, device=accelerator.device)
    final_loss = result.history[-1]["denoiser/loss"] if result.history else None
    first_loss = result.history[0]["denoiser/loss"] if result.history else None
    write_json(reports / "metrics.json",
               {"step": result.step, "first_loss": first_loss, "final_loss": final_loss, **grid_summary,
                "mixed_precision": accelerator.mixed_precision})
    return {
        "read": str(paths.latents),
        "wrote": [str(paths.ldm), str(reports)],
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "parameters": sum(p.numel() for p in denoiser.parameters()),
        "first_loss": first_loss,
        "final_loss": final_loss,
        **grid_summary,
    }


def write_sample_grid(paths: Paths, config: TrainLDMConfig, reports, device="cpu") -> dict:
    """One row per grid row of the conditioning (class, caption, or unconditional rows) of samples from the EMA
    weights with the stored defaults."""
    generator = load_generator(paths.ldm, autoencoder=paths.vae, device=device)
    per_row = config.grid_per_class
    requests = [row for row in generator.conditioning.grid_rows(paths.latents) for _ in range(per_row)]
    images, nfe = generator.generate(requests, seed_block(config.loop.seed, 0, len(requests)))
    save_grid(images, reports / "samples.png", columns=per_row)
    return {"grid_nfe": nfe, "grid_sampler": config.sampler, "grid_steps": config.sample_steps,
            "grid_guidance": config.guidance}
