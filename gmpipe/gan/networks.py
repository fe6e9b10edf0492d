"""The networks ``train_gan`` trains, built from its section: the class-conditional generator and the projection
discriminator of the preset's sizes."""

from __future__ import annotations

from gmpipe.config.train_gan import TrainGANConfig
from gmpipe.gan.discriminator import ProjectionDiscriminator
from gmpipe.gan.generator import ConditionalGenerator
from gmpipe.nn.presets import get_gan_preset


def build_networks(config: TrainGANConfig, latent_shape, n_classes: int) -> tuple[ConditionalGenerator,
                                                                                 ProjectionDiscriminator]:
    """A fresh generator and discriminator of the preset's sizes for latents (c, h, w) and ``n_classes``."""
    sizes = get_gan_preset(config.preset)
    generator = ConditionalGenerator(latent_shape, n_classes, z_dim=sizes.z_dim, embed_dim=sizes.embed_dim,
                                     width=sizes.width)
    discriminator = ProjectionDiscriminator(latent_shape, n_classes, width=sizes.disc_width,
                                            spectral_norm=config.spectral_norm)
    return generator, discriminator
