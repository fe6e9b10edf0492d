"""``train_vae``: a KL autoencoder (diffusers ``AutoencoderKL``) trained on the ELBO with a perceptual loss and a
patch discriminator on the decoder, through the shared training loop. Writes ``models/vae/``, which is also a
``vae_prior`` model folder (``gmpipe.vae.prior``: the autoencoder decoding z ~ N(0, I); written here through
``gmpipe.vae.density`` and ``gmpipe.family_file``, which import no model family), and its test negative ELBO in bits
per dimension into the metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gmpipe.artifacts import atomic_dir, write_json
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.data import DataConfig
from gmpipe.config.loop import resumable_keys
from gmpipe.config.train_vae import TrainVAEConfig
from gmpipe.data.prepared import load_manifest, load_split
from gmpipe.device import transfer
from gmpipe.errors import GmpipeError
from gmpipe.eval.autoencoder import autoencoder_metrics, reconstruct
from gmpipe.eval.grids import save_grid
from gmpipe.family_file import write_family_file
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_file, hash_tree, section_settings
from gmpipe.nn.autoencoder import downsampling_factor
from gmpipe.paths import Paths
from gmpipe.pixels import signed_to_uint8, uint8_to_signed
from gmpipe.seeds import seed_block
from gmpipe.train.loop import make_accelerator, seed_everything, train
from gmpipe.vae.density import PriorFile, fit_decoder_std, negative_elbo_bits
from gmpipe.vae.training import build_loss, build_models, loss_steps

DISCRIMINATOR_FILE = "discriminator.safetensors"
# Seed blocks (gmpipe.seeds.seed_block) of the posterior samples behind the decoder scale and the test ELBO, and
# how many images each uses (at most eval_images; the ELBO's standard error is reported): encoding and decoding
# 2 x 2,000 images took 52 s on the demo's autoencoder (one thread, machine at load 3), a quarter of that for 500.
DECODER_STD_SEEDS, ELBO_SEEDS = 0, 1
ELBO_IMAGES = 500

SECTIONS = ("data", "train_vae", "compute")


def training_fingerprint(data: DataConfig, config: TrainVAEConfig, paths: Paths) -> Fingerprint:
    """What defines the trained autoencoder: the data and model/loss keys (not how often nor the evaluation size;
    how long only where the learning rate decays over it), the prepared images, any LPIPS weight files, and the code
    of this stage."""
    settings = {**section_settings("data", data),
                **section_settings("train_vae", config, exclude=(*resumable_keys(config.loop), "eval_images"))}
    inputs = {paths.name(paths.prepared): hash_tree(paths.prepared), **code_hashes(__name__)}
    files = {"lpips_weights": config.lpips_weights, "lpips_backbone_weights": config.lpips_backbone_weights}
    if config.lpips_backbone_weights and not config.lpips_weights:
        from gmpipe.vae.perceptual import packaged_lpips_weights

        files["lpips_weights"] = packaged_lpips_weights("vgg")  # the installed package's heads define the loss too
    for key, path in files.items():
        if path and Path(path).is_file():
            inputs[f"train_vae.{key}"] = hash_file(Path(path))
    return Fingerprint(settings, inputs)


def mean_over_processes(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """tensor -> its mean over the data-parallel processes (an all-reduce); None with one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda tensor: accelerator.reduce(tensor, reduction="mean")


def vae_prior(vae, data: DataConfig, config: TrainVAEConfig, fit_name: str, fit_split, test_split, paths: Paths,
              device) -> tuple[PriorFile, dict]:
    """What makes the trained autoencoder a ``vae_prior`` model (``vae_prior.json``): its shapes and a decoder scale
    fitted on ``fit_split`` (named ``fit_name``: the validation images, or the training images when there are none);
    and its negative ELBO on test images as metrics (``gmpipe.vae.density``), ``ELBO_IMAGES`` of each at most."""
    rng = np.random.default_rng(config.loop.seed)
    n = min(config.eval_images, ELBO_IMAGES)
    fit_images = fit_split.images[rng.permutation(len(fit_split))[:n]]
    std = fit_decoder_std(vae, fit_images, seed_block(config.loop.seed, DECODER_STD_SEEDS, len(fit_images)),
                          device=device)
    factor = downsampling_factor(vae)
    prior = PriorFile(image_shape=[data.channels, data.image_size, data.image_size],
                      latent_shape=[config.latent_channels, data.image_size // factor, data.image_size // factor],
                      decoder_std=std, decoder_std_fitted_on=fit_name,
                      class_names=load_manifest(paths.prepared)["class_names"])
    test_images = test_split.images[rng.permutation(len(test_split))[:n]]
    reconstruction, kl = negative_elbo_bits(vae, test_images, seed_block(config.loop.seed, ELBO_SEEDS, n), std,
                                            device=device)
    bits = (reconstruction + kl).double()
    metrics = {"test_nelbo_bits_per_dim": float(bits.mean()),
               "test_nelbo_standard_error": float(bits.std() / math.sqrt(len(bits))) if len(bits) > 1 else 0.0,
               "test_nelbo_n": len(bits), "test_nelbo_reconstruction_bits_per_dim": float(reconstruction.mean()),
               "test_nelbo_kl_bits_per_dim": float(kl.mean()), "test_nelbo_decoder_std": std}
    return prior, metrics


def run(data: DataConfig, config: TrainVAEConfig, compute: ComputeConfig, paths: Paths) -> dict:
    train_split = load_split(paths.prepared, "train")
    test_split = load_split(paths.prepared, "test")
    if train_split.images.shape[1] != data.channels or train_split.images.shape[-1] != data.image_size:
        raise GmpipeError(
            f"{paths.prepared}: images are {train_split.images.shape[1:]} but data asks for "
            f"{data.channels}x{data.image_size}x{data.image_size}; rerun the 'prepare' stage"
        )
    images = torch.from_numpy(train_split.images)
    seed_everything(config.loop.seed)  # model initialisation depends on the seed, not on what ran before
    vae, discriminator = build_models(data, config)
    loss = build_loss(config)
    accelerator = make_accelerator(compute)

    def make_batch(index, device):
        return transfer(uint8_to_signed(images[index]), device)

    reports = paths.reports / "train_vae"
    steps = loss_steps(vae, discriminator, loss, config, mean_over_processes(accelerator))
    result = train(
        config.loop, steps, len(images), make_batch, paths.checkpoints / "train_vae", live_dir=reports / "live",
        ema_of="vae", accelerator=accelerator, description="train_vae",
        fingerprint=training_fingerprint(data, config, paths),
    )
    if not accelerator.is_main_process:
        return {}
    trained = result.ema.module if result.ema is not None and config.loop.ema_decay > 0 else result.modules["vae"]
    final = trained.vae.eval()  # the AutoencoderKL inside SampledReconstruction

    from gmpipe.nn.features import EffNetLite0Features

    device = accelerator.device
    metrics = autoencoder_metrics(final, test_split.images, train_split.images, EffNetLite0Features().to(device),
                                  n=config.eval_images, seed=config.loop.seed, device=device)
    metrics["step"] = result.step
    metrics["mixed_precision"] = accelerator.mixed_precision
    val = load_split(paths.prepared, "val")
    fit_name, fit_split = ("val", val) if len(val) else ("train", train_split)
    prior, elbo = vae_prior(final, data, config, fit_name, fit_split, test_split, paths, device)
    metrics.update(elbo)
    shown = uint8_to_signed(val.images[:16] if len(val) else test_split.images[:16])
    reconstructions, _ = reconstruct(final, shown, device=device)

    from safetensors.torch import save_file

    final = final.to("cpu")
    with atomic_dir(paths.vae) as out:
        final.save_pretrained(out, safe_serialization=True)
        prior.save(out)  # with family.json: the folder is also a vae_prior model (gmpipe.vae.prior)
        write_family_file(out, "vae_prior", "train_vae")
        save_file({k: v.detach().cpu().contiguous() for k, v in result.modules["discriminator"].state_dict().items()},
                  out / DISCRIMINATOR_FILE)
        (out / "discriminator.json").write_text(json.dumps(
            {"in_channels": data.channels, "width": config.disc_width, "n_layers": config.disc_layers}, indent=2))
    write_json(reports / "metrics.json", metrics)
    save_grid(np.concatenate([signed_to_uint8(shown), signed_to_uint8(reconstructions)]),
              reports / "reconstructions.png", columns=len(shown))
    return {
        "read": str(paths.prepared),
        "wrote": [str(paths.vae), str(reports)],
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    }
