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


def test_true_lpips_from_local_vgg16_and_lpips_files(tmp_path):
    """The LPIPS path for users who have the files: a VGG-16 trunk and LPIPS heads written by the test."""
    from safetensors.torch import save_file
    from torch import nn

    from gmpipe.eval.features import LPIPS_VGG16_TAPS, VGG16_LAYERS

    trunk, channels, index = {}, 3, 0
    for spec in VGG16_LAYERS:
        if spec == "M":
            index += 1
            continue
        conv = nn.Conv2d(channels, spec, 3, padding=1)
        trunk[f"features.{index}.weight"], trunk[f"features.{index}.bias"] = conv.weight.data, conv.bias.data
        channels, index = spec, index + 2
    save_file(trunk, tmp_path / "vgg16.safetensors")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "vgg.pth")
    assert len(LPIPS_VGG16_TAPS) == len(heads)

    params = parse_params(smoke_params(train_vae={"lpips_weights": str(tmp_path / "vgg.pth"),
                                                  "lpips_backbone_weights": str(tmp_path / "vgg16.safetensors")}))
    loss = train_vae.build_loss(params.train_vae)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert float(loss.perceptual.distance(x, x).abs().max()) < 1e-6
    distance = loss.perceptual.distance(x, y).sum()
    assert distance > 0
    distance.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0

    with pytest.raises(Exception, match="go together"):
        parse_params(smoke_params(train_vae={"lpips_weights": str(tmp_path / "vgg.pth")}))
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    bad = parse_params(smoke_params(train_vae={"lpips_weights": str(tmp_path / "vgg.pth"),
                                               "lpips_backbone_weights": str(tmp_path / "bad.pth")}))
    with pytest.raises(GmpipeError, match="not a VGG-16 state dict"):
        train_vae.build_loss(bad.train_vae)
