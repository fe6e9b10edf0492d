"""A smoke run of the train_vae stage writes every output, and the model reloads with diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from gmpipe.config.params import parse_params
from gmpipe.errors import GmpipeError
from gmpipe.nn.discriminator import PatchDiscriminator
from gmpipe.paths import Paths
from gmpipe.stages import prepare, train_vae
from tests.conftest import smoke_params


def test_smoke_run_writes_every_output_and_resumes(tmp_path):
    params = parse_params(smoke_params(train_vae={"steps": 20, "disc_start": 10, "checkpoint_every": 10}))
    paths = Paths(tmp_path)
    prepare.run(params.data, params.prepare, paths)
    summary = train_vae.run(params.data, params.train_vae, params.compute, paths)
    assert summary["steps"] == 20

    vae = AutoencoderKL.from_pretrained(paths.vae)
    x = torch.zeros(2, 1, 32, 32)
    assert vae.encode(x).latent_dist.mean.shape == (2, 4, 8, 8)
    discriminator = PatchDiscriminator(**json.loads((paths.vae / "discriminator.json").read_text()), norm_groups=8)
    discriminator.load_state_dict(load_file(paths.vae / "discriminator.safetensors"))

    metrics = json.loads((paths.reports / "train_vae/metrics.json").read_text())
    assert {"psnr", "ssim", "kl", "fd_effnet_recon", "fd_effnet_floor", "fd_ratio", "n"} <= set(metrics)
    assert metrics["psnr"] > 5 and metrics["n"] == 100
    assert (paths.reports / "train_vae/reconstructions.png").stat().st_size > 0
    curves = paths.reports / "train_vae/live/plots/metrics"
    assert (curves / "vae/nll.tsv").is_file() and (curves / "discriminator/discriminator.tsv").is_file()

    # More steps continue from the last checkpoint instead of starting over.
    longer = parse_params(smoke_params(train_vae={"steps": 25, "disc_start": 10, "checkpoint_every": 10}))
    again = train_vae.run(longer.data, longer.train_vae, longer.compute, paths)
    assert again["resumed_from"] == 20 and again["steps"] == 25


def test_discriminator_frozen_before_disc_start_and_trained_after(tmp_path):
    overrides = {"steps": 3, "disc_start": 3, "perceptual_weight": 0.0, "warmup_steps": 0}
    params = parse_params(smoke_params(train_vae=overrides))
    vae, discriminator = train_vae.build_models(params.data, params.train_vae)
    loss = train_vae.build_loss(params.train_vae)
    steps = train_vae.loss_steps(vae, discriminator, loss, params.train_vae)
    before = {k: v.clone() for k, v in discriminator.state_dict().items()}
    from gmpipe.train.loop import train

    images = torch.rand(64, 1, 32, 32) * 2 - 1
    train(params.train_vae, steps, 64, lambda i, d: images[i], tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in discriminator.state_dict().items())

    later = params.train_vae.model_copy(update={"steps": 5})
    train(later, steps, 64, lambda i, d: images[i], tmp_path / "b")
    assert not all(torch.equal(before[k], v) for k, v in discriminator.state_dict().items())


def test_bad_architecture_for_image_size_is_a_clear_error():
    params = parse_params(smoke_params(data={"image_size": 28}, train_vae={"block_out_channels": [8, 8, 8, 8]}))
    with pytest.raises(GmpipeError, match="train_vae.block_out_channels"):
        train_vae.build_models(params.data, params.train_vae)
