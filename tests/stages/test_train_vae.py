"""A smoke run of the train_vae stage writes every output, and the model reloads with diffusers and as the VAE prior."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from gmpipe.config.params import ParamsError, parse_params
from gmpipe.errors import GmpipeError
from gmpipe.generator import load_generator
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
    # The folder is also the VAE prior generator; its test negative ELBO is reported with its terms.
    assert metrics["test_nelbo_n"] == 100 and metrics["test_nelbo_bits_per_dim"] == pytest.approx(
        metrics["test_nelbo_reconstruction_bits_per_dim"] + metrics["test_nelbo_kl_bits_per_dim"])
    prior = load_generator(paths.vae)
    assert prior.settings == {"temperature": 1.0} and prior.prior.decoder_std == metrics["test_nelbo_decoder_std"]
    assert prior.generate(None, [0, 1])[0].shape == (2, 1, 32, 32)
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
    train(params.train_vae.loop, steps, 64, lambda i, d: images[i], tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in discriminator.state_dict().items())

    later = params.train_vae.replace(steps=5)
    train(later.loop, steps, 64, lambda i, d: images[i], tmp_path / "b")
    assert not all(torch.equal(before[k], v) for k, v in discriminator.state_dict().items())


def test_bad_architecture_for_image_size_is_a_clear_error():
    params = parse_params(smoke_params(data={"image_size": 28}, train_vae={"block_out_channels": [8, 8, 8, 8]}))
    with pytest.raises(GmpipeError, match="train_vae.block_out_channels"):
        train_vae.build_models(params.data, params.train_vae)


def test_true_lpips_from_local_vgg16_and_lpips_files(tmp_path, monkeypatch):
    """The LPIPS path for users who have the files: a VGG-16 trunk and LPIPS heads written by the test."""
    from safetensors.torch import save_file
    from torch import nn

    from gmpipe.nn.features import LPIPS_VGG16_TAPS, VGG16_LAYERS

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
    with pytest.raises(ParamsError, match="train_vae: perceptual_blocks names EfficientNet-Lite0 blocks"):
        parse_params(smoke_params(train_vae={"lpips_weights": str(tmp_path / "vgg.pth"), "perceptual_blocks": [0],
                                             "lpips_backbone_weights": str(tmp_path / "vgg16.safetensors")}))

    # The trunk alone takes the heads an installed lpips package ships (weights/v0.1/vgg.pth), found without
    # importing the package (its import needs torchvision: this one refuses to be imported at all).
    from gmpipe.vae import perceptual

    package = tmp_path / "site" / "gmpipe_test_lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('lpips imports torchvision')\n")
    torch.save(heads, package / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(perceptual, "LPIPS_PACKAGE", "gmpipe_test_lpips")
    trunk_only = parse_params(smoke_params(train_vae={"lpips_backbone_weights": str(tmp_path / "vgg16.safetensors")}))
    packaged = train_vae.build_loss(trunk_only.train_vae).perceptual
    for index, weight in enumerate(heads.values()):
        torch.testing.assert_close(getattr(packaged, f"layer_weight_{index}"), weight.flatten())
    fingerprint = train_vae.training_fingerprint(trunk_only.data, trunk_only.train_vae, Paths(tmp_path))
    assert "train_vae.lpips_weights" in fingerprint.inputs  # the packaged heads define the trained model too
    monkeypatch.setattr(perceptual, "LPIPS_PACKAGE", "gmpipe_test_no_such_package")
    with pytest.raises(GmpipeError, match="lpips_backbone_weights: the LPIPS heads .* install the lpips package"):
        train_vae.build_loss(trunk_only.train_vae)
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    bad = parse_params(smoke_params(train_vae={"lpips_weights": str(tmp_path / "vgg.pth"),
                                               "lpips_backbone_weights": str(tmp_path / "bad.pth")}))
    with pytest.raises(GmpipeError, match="not a VGG-16 state dict"):
        train_vae.build_loss(bad.train_vae)


def test_the_perceptual_term_compares_the_blocks_asked_for(tmp_path):
    """train_vae.perceptual_blocks picks the EfficientNet-Lite0 maps the loss compares, and defines the model: other
    blocks are another training fingerprint (a resumed run starts over)."""
    default = parse_params(smoke_params(train_vae={"perceptual_weight": 1.0}))
    chosen = parse_params(smoke_params(train_vae={"perceptual_weight": 1.0, "perceptual_blocks": [2, 0, 1]}))
    assert default.train_vae.perceptual_blocks == [0, 2, 4, 10] and chosen.train_vae.perceptual_blocks == [0, 1, 2]
    loss = train_vae.build_loss(chosen.train_vae)
    assert loss.perceptual.extractor.map_blocks == (0, 1, 2)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert len(loss.perceptual.extractor.feature_maps(x)) == 3
    assert float(loss.perceptual.distance(x, x.flip(-1)).mean()) > 0
    paths = Paths(tmp_path)
    fingerprints = [train_vae.training_fingerprint(p.data, p.train_vae, paths) for p in (default, chosen)]
    assert fingerprints[0].settings["train_vae.perceptual_blocks"] == [0, 2, 4, 10]
    assert fingerprints[0].settings != fingerprints[1].settings


def _two_process_vae_worker(directory: str):
    """One rank of train_vae's two loss steps on 2 CPU processes (DistributedDataParallel over gloo)."""
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from gmpipe.train.loop import seed_everything, train

    # debug_launcher forks: drop the single-process state that earlier code left in this process.
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    rank = accelerator.process_index
    params = parse_params(smoke_params(train_vae={"steps": 4, "disc_start": 1, "perceptual_weight": 0.0,
                                                  "warmup_steps": 0, "checkpoint_every": 4, "batch_size": 8}))
    config = params.train_vae
    seed_everything(0)
    vae, discriminator = train_vae.build_models(params.data, config)
    loss = train_vae.build_loss(config)
    gradient_mean = train_vae.mean_over_processes(accelerator)
    images = torch.rand(32, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    steps = train_vae.loss_steps(vae, discriminator, loss, config, gradient_mean)
    result = train(config.loop, steps, len(images), lambda index, device: images[index].to(device),
                   Path(directory) / "ckpt", accelerator=accelerator, ema_of="vae")
    assert result.history[-1]["discriminator/discriminator"] > 0  # the discriminator step ran

    # The adaptive GAN weight of each rank's half of a batch equals the one of the whole batch in one process.
    from gmpipe.nn.autoencoder import decoder_last_layer

    def weight(x, mean_fn):
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.mean).sample
        _, terms = loss.generator_loss(x, posterior.mean, posterior.logvar, x_hat, discriminator, 5,
                                       decoder_last_layer(vae), gradient_mean=mean_fn)
        return terms["adaptive_weight"]

    batch = images[:8]
    per_rank = weight(batch[4 * rank : 4 * rank + 4], gradient_mean)
    whole = weight(batch, None)
    flat = torch.cat([p.detach().flatten() for module in result.modules.values() for p in module.parameters()])
    gathered = accelerator.gather(torch.cat([per_rank[None], whole[None], flat])[None])
    if accelerator.is_main_process:
        torch.save(gathered, Path(directory) / "gathered.pt")


def test_two_processes_train_the_autoencoder_and_discriminator_in_step(tmp_path):
    """train_vae's steps on 2 CPU ranks through accelerate.debug_launcher (in a fresh interpreter: it forks):
    gradients of both the autoencoder and the discriminator are all-reduced (the ranks, which see different
    images, end with identical weights), and the adaptive GAN weight is the global batch's on every rank."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (
        "from accelerate import debug_launcher; from tests.stages.test_train_vae import _two_process_vae_worker; "
        f"debug_launcher(_two_process_vae_worker, args=({str(tmp_path)!r},), num_processes=2)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert gathered.shape[0] == 2
    (weight_0, whole_0), (weight_1, _) = gathered[0, :2].tolist(), gathered[1, :2].tolist()
    assert weight_0 == pytest.approx(whole_0, rel=1e-4) and weight_1 == pytest.approx(whole_0, rel=1e-4)
    assert torch.equal(gathered[0, 2:], gathered[1, 2:]), "the ranks' weights diverged"
