"""``train_ldm``: a latent denoiser trained on the generalized objective through the shared loop (EMA on).
Writes ``models/ldm/`` (see :mod:`gmpipe.generate`), a per-class sample grid and loss curves."""

from __future__ import annotations

import json

from gmpipe.artifacts import atomic_dir, read_json, write_json
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.loop import RESUMABLE_KEYS
from gmpipe.config.train_ldm import TrainLDMConfig
from gmpipe.data.latents import STATS, LatentStats, load_split, load_text_encoder_info, load_texts
from gmpipe.data.prepared import MANIFEST, load_manifest
from gmpipe.diffusion import Objective
from gmpipe.errors import GmpipeError
from gmpipe.eval.grids import save_grid, to_uint8
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_tree, section_settings
from gmpipe.generate import LatentGenerator, save_model_bundle
from gmpipe.paths import Paths
from gmpipe.train.loop import LossStep, make_accelerator, seed_everything, to_device, train

SECTIONS = ("train_ldm", "compute")


def load_training_latents(config: TrainLDMConfig, paths: Paths):
    """Train latents, the measured stats, and (for text conditioning) the caption embeddings."""
    split = load_split(paths.latents, "train")
    stats = LatentStats.load(paths.latents / STATS)
    texts = load_texts(paths.latents) if config.conditioning == "text" else None
    return split, stats, texts


def make_batch_fn(split, stats: LatentStats, texts, mode: str):
    """index -> (normalized posterior sample (B, c, h, w), condition); z is drawn fresh every time."""
    states, mask = (texts[1], texts[2]) if texts is not None else (None, None)

    def make_batch(index, device):
        latents = to_device(stats.normalize(split.sample(index)), device)
        if mode == "class":
            return latents, to_device(split.labels[index], device)
        if mode == "text":
            caption = split.caption_index[index]
            return latents, (to_device(states[caption], device), to_device(mask[caption], device))
        return latents, None

    return make_batch


def denoising_step(denoiser, objective: Objective, config: TrainLDMConfig) -> LossStep:
    """The generalized objective with condition dropout: w(t) || F(x_t, t, c) - (c(t) x + d(t) z) ||^2."""

    def loss(batch, step, context, modules):
        latents, cond = batch
        if cond is not None:
            cond = denoiser.drop_condition(cond, config.p_uncond)
        per_sample = objective.loss(lambda x_t, t: modules["denoiser"](x_t, t, cond), latents)
        value = per_sample.mean()
        return value, {"loss": value.detach()}

    return LossStep("denoiser", denoiser, loss)


def build_denoiser(config: TrainLDMConfig, latent_shape, num_classes: int, text_dim: int | None):
    from gmpipe.nn.denoiser import Denoiser

    channels, height, width = latent_shape
    if height != width:
        raise GmpipeError(f"latents are {height}x{width}; the denoiser needs square latents")
    return Denoiser(config.conditioning, channels, height, config.preset, num_classes=num_classes, text_dim=text_dim)


# Keys that only choose how the finished model samples by default (stored in sampling.json, used for its grid).
SAMPLING_KEYS = ("sampler", "sample_steps", "guidance", "grid_per_class")


def training_fingerprint(config: TrainLDMConfig, paths: Paths) -> Fingerprint:
    """What defines the trained denoiser: model, objective and loop keys, the cached latents, the class list, and
    the code of this stage."""
    settings = section_settings("train_ldm", config, exclude=(*RESUMABLE_KEYS, *SAMPLING_KEYS))
    manifest = paths.prepared / MANIFEST
    return Fingerprint(settings, {paths.name(paths.latents): hash_tree(paths.latents),
                                  paths.name(manifest): hash_tree(manifest), **code_hashes(__name__)})


def run(config: TrainLDMConfig, compute: ComputeConfig, paths: Paths) -> dict:
    split, stats, texts = load_training_latents(config, paths)
    manifest = load_manifest(paths.prepared)
    class_names = manifest["class_names"]
    latent_shape = tuple(split.mean.shape[1:])
    text_dim = texts[1].shape[-1] if texts is not None else None
    seed_everything(config.seed)  # model initialisation depends on the seed, not on what ran before
    denoiser = build_denoiser(config, latent_shape, len(class_names), text_dim)
    objective = Objective.from_config(config.objective_config())
    accelerator = make_accelerator(compute)
    reports = paths.reports / "train_ldm"
    result = train(
        config, [denoising_step(denoiser, objective, config)], len(split),
        make_batch_fn(split, stats, texts, config.conditioning), paths.checkpoints / "train_ldm",
        live_dir=reports / "live", ema_of="denoiser", accelerator=accelerator, description="train_ldm",
        fingerprint=training_fingerprint(config, paths),
    )
    if not accelerator.is_main_process:
        return {}
    stats_source = read_json(paths.latents / STATS, "cache_latents")
    conditioning = {"mode": config.conditioning, "class_names": class_names}
    if config.conditioning == "text":
        cache_config = load_text_encoder_info(paths.latents)
        conditioning.update(cache_config)
    # The sampling grid uses the same resolution shift as the training time density.
    sampling = {"sampler": config.sampler, "steps": config.sample_steps, "guidance": config.guidance,
                "shift": config.time_shift}
    with atomic_dir(paths.ldm) as out:
        result.ema.module.to("cpu").save_pretrained(out / "denoiser")
        result.modules["denoiser"].to("cpu").save_pretrained(out / "denoiser_raw")
        save_model_bundle(out, objective, paths.latents / STATS, conditioning, sampling)
        (out / "training.json").write_text(json.dumps(
            {"steps": result.step, "config": json.loads(config.model_dump_json()), "latent_stats": stats_source},
            indent=2))

    grid_summary = write_sample_grid(paths, config, class_names, reports, device=accelerator.device)
    final_loss = result.history[-1]["denoiser/loss"] if result.history else None
    first_loss = result.history[0]["denoiser/loss"] if result.history else None
    write_json(reports / "metrics.json",
               {"step": result.step, "first_loss": first_loss, "final_loss": final_loss, **grid_summary})
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


def write_sample_grid(paths: Paths, config: TrainLDMConfig, class_names: list[str], reports, device="cpu") -> dict:
    """One row per class (or per distinct caption) of samples from the EMA weights with the stored defaults."""
    generator = LatentGenerator.load(paths.ldm, paths.vae, device=device)
    per_row = config.grid_per_class
    if config.conditioning == "class":
        rows = len(class_names)
        cond = generator.condition(labels=[c for c in range(rows) for _ in range(per_row)])
    elif config.conditioning == "text":
        captions = load_texts(paths.latents)[0][:10]
        rows = len(captions)
        cond = generator.condition(prompts=[c for c in captions for _ in range(per_row)])
    else:
        rows, cond = 4, None
    latents, nfe = generator.sample_latents(cond, rows * per_row, seed=config.seed)
    images = generator.decode(latents)
    save_grid(to_uint8(images), reports / "samples.png", columns=per_row)
    return {"grid_nfe": nfe, "grid_sampler": config.sampler, "grid_steps": config.sample_steps,
            "grid_guidance": config.guidance}
