"""``train_ar``: the autoregressive prior over latent tokens, trained by maximum likelihood through the shared loop
(EMA on). Writes ``models/ar/`` (the layout of :mod:`gmpipe.ar.family`), the exact test likelihood, the tokenizer's
reconstruction floor, a sample grid and loss curves."""

from __future__ import annotations

import json

import torch

from gmpipe.ar.data import make_token_batch_fn, normalized_latents, tokenize_split
from gmpipe.ar.family import AutoregressivePrior
from gmpipe.ar.likelihood import (
    ar_loss_step,
    bits_per_dim_piecewise_uniform,
    marginal_bits_per_token,
    token_likelihood,
)
from gmpipe.ar.model import LatentAR
from gmpipe.ar.tokenizer import LatentTokenizer, reconstruction_floor
from gmpipe.artifacts import atomic_dir, read_json, write_json
from gmpipe.conditioning import Conditioning
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.loop import resumable_keys
from gmpipe.config.train_ar import TrainARConfig
from gmpipe.data.latents import STATS, LatentStats, load_split
from gmpipe.data.prepared import MANIFEST, load_manifest
from gmpipe.eval.grids import save_grid
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_tree, section_settings
from gmpipe.generator import load_generator
from gmpipe.paths import Paths
from gmpipe.seeds import seed_block
from gmpipe.train.loop import make_accelerator, seed_everything, train

SECTIONS = ("train_ar", "compute")

# Keys used only after training: the stored sampling defaults, the grid and the size of the test set measured.
AFTER_TRAINING_KEYS = ("guidance", "temperature", "top_k", "grid_per_class", "nll_items")


def training_fingerprint(config: TrainARConfig, paths: Paths) -> Fingerprint:
    """What defines the trained prior: tokenizer, model and loop keys, the cached latents (the tokenizer is fitted
    on them), the class list, and the code of this stage."""
    settings = section_settings("train_ar", config, exclude=(*resumable_keys(config.loop), *AFTER_TRAINING_KEYS))
    manifest = paths.prepared / MANIFEST
    return Fingerprint(settings, {paths.name(paths.latents): hash_tree(paths.latents),
                                  paths.name(manifest): hash_tree(manifest), **code_hashes(__name__)})


def fit_tokenizer(config: TrainARConfig, train_latents: torch.Tensor) -> LatentTokenizer:
    """The tokenizer of ``config`` fitted on normalized training latents (N, c, h, w)."""
    return LatentTokenizer.fit(train_latents, config.bins, config.clip, config.spacing)


def run(config: TrainARConfig, compute: ComputeConfig, paths: Paths) -> dict:
    split = load_split(paths.latents, "train")
    stats = LatentStats.load(paths.latents / STATS)
    class_names = load_manifest(paths.prepared)["class_names"]
    conditioning = Conditioning.for_training(config.conditioning, class_names, paths.latents)
    # One seeded draw of every training latent: the tokenizer's fitting data (the same on every rank and rerun).
    fitting = normalized_latents(split, stats, torch.arange(len(split)), config.posterior,
                                 torch.Generator().manual_seed(config.loop.seed))
    tokenizer = fit_tokenizer(config, fitting)
    seed_everything(config.loop.seed)  # model initialisation depends on the seed, not on what ran before
    num_classes = len(class_names) if conditioning.conditional else 1
    model = LatentAR(tokenizer.bins, num_classes, tokenizer.sequence_length, config.preset, config.dropout)
    null_label = None if conditioning.conditional else model.null_label
    accelerator = make_accelerator(compute)
    reports = paths.reports / "train_ar"
    result = train(
        config.loop, [ar_loss_step(model, config.p_uncond)], len(split),
        make_token_batch_fn(split, stats, tokenizer, config.posterior, null_label),
        paths.checkpoints / "train_ar", live_dir=reports / "live", ema_of="ar", accelerator=accelerator,
        description="train_ar", fingerprint=training_fingerprint(config, paths),
    )
    if not accelerator.is_main_process:
        return {}
    settings = {"guidance": config.guidance, "temperature": config.temperature, "top_k": config.top_k}
    prior = AutoregressivePrior(result.ema.module.to("cpu"), tokenizer, stats, conditioning, settings)
    with atomic_dir(paths.ar) as out:
        prior.save(out, "train_ar", stats_file=paths.latents / STATS)
        (out / "training.json").write_text(json.dumps(
            {"steps": result.step, "config": config.model_dump(mode="json"),
             "latent_stats": read_json(paths.latents / STATS, "cache_latents")}, indent=2))

    likelihood = test_likelihood(config, prior, paths, tokenizer.encode(fitting), device=accelerator.device)
    grid = write_sample_grid(paths, config, reports, device=accelerator.device)
    history = [record["ar/bits_per_token"] for record in result.history]
    metrics = {"step": result.step, "first_bits_per_token": history[0] if history else None,
               "final_bits_per_token": history[-1] if history else None,
               "sequence_length": tokenizer.sequence_length, "bins": tokenizer.bins, **likelihood, **grid,
               "mixed_precision": accelerator.mixed_precision}
    write_json(reports / "metrics.json", metrics)
    return {"read": str(paths.latents), "wrote": [str(paths.ar), str(reports)], "steps": result.step,
            "resumed_from": result.resumed_from, "parameters": model.num_parameters(), **metrics}


@torch.no_grad()
def test_likelihood(config: TrainARConfig, prior: AutoregressivePrior, paths: Paths, train_tokens: torch.Tensor,
                    device="cpu") -> dict:
    """On ``nll_items`` test latents (a seeded subset; all for null), tokenized as in training (a seeded posterior
    draw for ``posterior: sample``): the exact NLL in bits per token and per sequence, bits per latent value under
    the piecewise-uniform reading, the unconditional model's bits (the null class), the context-free reference
    (each position's token frequencies in the training tokens) and the tokenizer's reconstruction floor."""
    test = load_split(paths.latents, "test").subset(config.nll_items, seed=config.loop.seed)
    model, tokenizer = prior.model.to(device), prior.tokenizer
    tokens, labels = tokenize_split(test, prior.stats, tokenizer, config.posterior, seed=config.loop.seed)
    conditional = prior.conditioning.conditional
    exact = token_likelihood(model, tokens, labels if conditional else None)
    floor = reconstruction_floor(tokenizer, normalized_latents(
        test, prior.stats, torch.arange(len(test)), config.posterior, torch.Generator().manual_seed(config.loop.seed)))
    measured = {
        "test_bits_per_token": exact.bits_per_token,
        "test_bits_per_sequence": exact.bits_per_sequence,
        "test_bits_per_dim": bits_per_dim_piecewise_uniform(exact, tokenizer, tokens),
        "test_sequences": exact.n_sequences,
        "test_tokens": exact.n_tokens,
        "marginal_bits_per_token": marginal_bits_per_token(train_tokens, tokens, tokenizer.bins),
        "tokenizer_floor": floor.to_dict(),
    }
    if conditional:
        measured["test_bits_per_token_unconditional"] = token_likelihood(model, tokens, None).bits_per_token
    return measured


def write_sample_grid(paths: Paths, config: TrainARConfig, reports, device="cpu") -> dict:
    """One row per grid row of the conditioning (each class, or unconditional rows) of samples from the EMA weights
    with the stored sampling defaults."""
    generator = load_generator(paths.ar, autoencoder=paths.vae, device=device, missing_stage="train_ar")
    per_row = config.grid_per_class
    requests = [row for row in generator.conditioning.grid_rows(paths.latents) for _ in range(per_row)]
    images, nfe = generator.generate(requests, seed_block(config.loop.seed, 0, len(requests)))
    save_grid(images, reports / "samples.png", columns=per_row)
    return {"nfe": nfe, "grid_guidance": generator.settings["guidance"] if generator.conditioning.conditional else 0.0,
            "grid_temperature": config.temperature, "grid_top_k": config.top_k}
