"""What ``train_vae`` trains, built from its section: the autoencoder and the patch discriminator, the loss (ELBO
terms, perceptual distance, adversarial term with its adaptive weight) and the two LossSteps of the shared loop.
The stage runs them; benchmarks and tests build the same step from here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gmpipe.config.data import DataConfig
from gmpipe.config.train_vae import TrainVAEConfig
from gmpipe.errors import GmpipeError
from gmpipe.nn.autoencoder import build_autoencoder, check_image_size, decoder_last_layer
from gmpipe.nn.discriminator import PatchDiscriminator
from gmpipe.train.step import LossStep
from gmpipe.vae.autoencoder_loss import AutoencoderLoss
from gmpipe.vae.sampled_reconstruction import SampledReconstruction


def build_models(data: DataConfig, config: TrainVAEConfig):
    vae = build_autoencoder(
        data.channels, tuple(config.block_out_channels), config.latent_channels, config.layers_per_block,
        config.norm_num_groups, config.mid_block_attention,
    )
    try:
        check_image_size(vae, data.image_size, data.image_size)
    except ValueError as exc:
        raise GmpipeError(f"train_vae.block_out_channels: {exc}") from None
    discriminator = PatchDiscriminator(data.channels, config.disc_width, config.disc_layers,
                                       norm_groups=min(32, config.disc_width))
    return vae, discriminator


def build_loss(config: TrainVAEConfig) -> AutoencoderLoss:
    perceptual = None
    if config.perceptual_weight > 0:
        from gmpipe.nn.features import EffNetLite0Features
        from gmpipe.vae.perceptual import PerceptualLoss

        if config.lpips_backbone_weights:
            from gmpipe.nn.features import VGG16Features

            heads = lpips_heads(config)
            for key, path in (("lpips_weights", heads), ("lpips_backbone_weights", config.lpips_backbone_weights)):
                if not Path(path).is_file():
                    raise GmpipeError(f"train_vae.{key}: {path}: file not found")
            try:
                trunk = VGG16Features(config.lpips_backbone_weights)
                perceptual = PerceptualLoss.from_lpips_weights(heads, trunk)
            except ValueError as exc:
                raise GmpipeError(f"train_vae.lpips_weights: {exc}") from None
        else:
            perceptual = PerceptualLoss(EffNetLite0Features(image_size=config.perceptual_image_size,
                                                            map_blocks=config.perceptual_blocks))
    return AutoencoderLoss(
        rec_kind=config.rec_loss, kl_weight=config.kl_weight, perceptual_weight=config.perceptual_weight,
        gan_weight=config.gan_weight, gan_loss=config.gan_loss, disc_start=config.disc_start,
        perceptual_loss=perceptual,
    )


def lpips_heads(config: TrainVAEConfig) -> str:
    """The LPIPS heads file: ``lpips_weights``, else the VGG heads of an installed ``lpips`` package."""
    if config.lpips_weights:
        return config.lpips_weights
    from gmpipe.vae.perceptual import packaged_lpips_weights

    packaged = packaged_lpips_weights("vgg")
    if packaged is None:
        raise GmpipeError("train_vae.lpips_backbone_weights: the LPIPS heads for the VGG-16 trunk are missing: set "
                          "train_vae.lpips_weights to a vgg.pth, or install the lpips package (pip install --no-deps "
                          "lpips ships the heads)")
    return str(packaged)


def loss_steps(vae, discriminator, loss: AutoencoderLoss, config: TrainVAEConfig,
               gradient_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[LossStep]:
    """The generator (autoencoder) step, then the discriminator step once it is switched on.

    The autoencoder step trains ``SampledReconstruction(vae)``, whose forward is what data-parallel training wraps;
    ``gradient_mean`` (an all-reduce mean, None with one process) makes the adaptive GAN weight the global batch's.
    """
    loss.to(next(vae.parameters()).device)
    autoencoder = SampledReconstruction(vae)

    def autoencoder_step(x, step, context, modules):
        x_hat, mean, logvar = modules["vae"](x)
        context["x_hat"] = x_hat.detach()
        last_layer = decoder_last_layer(vae) if loss.discriminator_active(step) else None
        return loss.generator_loss(x, mean, logvar, x_hat, modules["discriminator"], step, last_layer,
                                   gradient_mean=gradient_mean)

    def discriminator_step(x, step, context, modules):
        if not loss.discriminator_active(step):
            return None, {}
        return loss.discriminator_loss(x, context["x_hat"], modules["discriminator"], step)

    return [
        LossStep("vae", autoencoder, autoencoder_step),
        LossStep("discriminator", discriminator, discriminator_step, lr=config.disc_lr),
    ]
